package main

import (
	"reflect"
	"strings"
	"time"

	"github.com/cachecar/cachecar/configs"
)

// configYAML turns the configuration into the shape of cachecar.yaml (its mapstructure key
// names, durations as text), so that check-config prints a file cachecar can read back.
func configYAML(cfg configs.Config) map[string]any {
	return toMap(reflect.ValueOf(cfg)).(map[string]any)
}

func toMap(v reflect.Value) any {
	if d, ok := v.Interface().(time.Duration); ok {
		return d.String()
	}
	switch v.Kind() {
	case reflect.Struct:
		out := map[string]any{}
		t := v.Type()
		for i := 0; i < t.NumField(); i++ {
			name, opts, _ := strings.Cut(t.Field(i).Tag.Get("mapstructure"), ",")
			if name == "" || name == "-" || (opts == "omitempty" && v.Field(i).IsZero()) {
				continue
			}
			out[name] = toMap(v.Field(i))
		}
		return out
	case reflect.Slice:
		out := make([]any, v.Len())
		for i := range out {
			out[i] = toMap(v.Index(i))
		}
		return out
	default:
		return v.Interface()
	}
}
