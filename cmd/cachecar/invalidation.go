package main

import (
	"slices"
	"sort"
	"strconv"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/cachecar/cachecar/configs"
	"github.com/cachecar/cachecar/invalidation"
	"github.com/cachecar/cachecar/proxy"
)

// policyNames are the configured policies in a fixed order.
func policyNames(cfg *configs.Config) []string {
	names := make([]string, 0, len(configs.PolicyParams))
	for n := range cfg.Policies.Named() {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// invalidationSpec turns the policies' invalidate_on into the triggers' and listener's rules,
// and marks the compiled policies (Invalidated, Tags) to match. With invalidation disabled it
// returns a spec without rules: migrate then removes every trigger, and entries live by TTL.
func invalidationSpec(cfg *configs.Config, pol proxy.Policies) (invalidation.Spec, error) {
	spec := invalidation.Spec{Channel: cfg.Invalidation.Channel, MaxRows: cfg.Invalidation.MaxRows}
	if !cfg.Invalidation.Enabled {
		return spec, nil
	}
	compiled := byName(pol)
	named := cfg.Policies.Named()
	for _, name := range policyNames(cfg) {
		p := compiled[name]
		params := configs.PolicyParams[name]
		for _, d := range named[name].InvalidateOn {
			var bound, cols []string
			for _, ph := range params { // key order
				if c, ok := d.Columns[ph]; ok {
					bound = append(bound, ph)
					cols = append(cols, c)
				}
			}
			p.Invalidated = true
			rule := invalidation.Rule{Policy: name, Table: d.Table, Columns: cols}
			// Bound placeholders are ids (configs.BindableParams): a value that is not a valid
			// id of the policy names no key.
			valid := func(vals []string) ([]string, bool) {
				out := make([]string, len(vals))
				for i, v := range vals {
					id, err := p.ParseID(bound[i], v)
					if err != nil {
						return nil, false
					}
					out[i] = strconv.FormatInt(id, 10)
				}
				return out, true
			}
			ns := cfg.Namespace
			if len(bound) == len(params) {
				rule.Target = func(vals []string) (string, bool, bool) {
					v, ok := valid(vals)
					if !ok {
						return "", false, false
					}
					return ns + p.Key.Render(v...), false, true
				}
			} else {
				tag, err := tagFor(p, params, bound)
				if err != nil {
					return spec, err
				}
				rule.Target = func(vals []string) (string, bool, bool) {
					v, ok := valid(vals)
					if !ok {
						return "", false, false
					}
					return ns + tag.RenderBound(v...), true, true
				}
			}
			spec.Rules = append(spec.Rules, rule)
		}
	}
	return spec, nil
}

// tagFor returns p's tag over bound, adding it to p.Tags the first time.
func tagFor(p *cachepolicy.Policy, params, bound []string) (*cachepolicy.Tag, error) {
	for _, t := range p.Tags {
		if slices.Equal(t.Params(), bound) {
			return t, nil
		}
	}
	t, err := cachepolicy.NewTag(p.Name, params, bound)
	if err != nil {
		return nil, err
	}
	p.Tags = append(p.Tags, t)
	return t, nil
}

// byName returns the compiled policies by their config names.
func byName(pol proxy.Policies) map[string]*cachepolicy.Policy {
	return map[string]*cachepolicy.Policy{
		"tenant": pol.Tenant, "course": pol.Course, "dispatch": pol.Dispatch,
		"dispatch_list": pol.DispatchList, "tenant_stats": pol.TenantStats,
	}
}
