# cachecar: `make run` and `make test` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin

PG_PORT     ?= 5432
REDIS_PORT  ?= 6379
DB_USER     ?= cachecar
DB_PASSWORD ?= cachecar
DB_NAME     ?= cachecar
TEST_DB_NAME ?= cachecar_test
export PG_PORT REDIS_PORT DB_USER DB_PASSWORD DB_NAME TEST_DB_NAME

DEMO_DATABASE_URL := postgres://$(DB_USER):$(DB_PASSWORD)@127.0.0.1:$(PG_PORT)/$(DB_NAME)?sslmode=disable
TEST_DATABASE_URL := postgres://$(DB_USER):$(DB_PASSWORD)@127.0.0.1:$(PG_PORT)/$(TEST_DB_NAME)?sslmode=disable

# What the sidecar and the tests are pointed at.
RUN_ENV  := DATABASE_URL='$(DEMO_DATABASE_URL)' REDIS_HOST=127.0.0.1 REDIS_PORT=$(REDIS_PORT)
# PgBouncer, for the tests of the listener and the session copies behind a pooler.
PGBOUNCER := /usr/sbin/pgbouncer
TEST_ENV := CACHECAR_TEST_DATABASE_URL='$(TEST_DATABASE_URL)' \
            CACHECAR_TEST_VALKEY_ADDR=127.0.0.1:$(REDIS_PORT) \
            CACHECAR_TEST_REDIS_SERVER=$$(command -v redis-server) \
            CACHECAR_TEST_PGBOUNCER=$(PGBOUNCER)

GO_TEST_FLAGS ?= -race -count=1 -p 1 -timeout 12m
# The real connect-redis and connect-pg-simple, for the sessions' rolling-migration tests.
NODE_STORES := sessions/testdata/node
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)

.PHONY: run test build services services-down migrate bench fuzz vet fmt check-go clean node-stores promtool pgbouncer

run: check-go services build migrate
	@echo
	@echo "cachecar is starting. Try:"
	@echo "  curl -i http://127.0.0.1:8080/v1/courses/1        (twice: X-Cache MISS, then HIT)"
	@echo "  psql postgres://cachecar:cachecar@127.0.0.1:5432/cachecar -c \"UPDATE courses SET title = 'New' WHERE id = 1\""
	@echo "  curl -i http://127.0.0.1:8080/v1/courses/1        (the write is seen at once: MISS with the new title)"
	@echo "  curl -i 'http://127.0.0.1:8080/v1/courses?ids=1,2,3'"
	@echo "  curl -i http://127.0.0.1:8080/v1/tenants/1"
	@echo "  curl -i http://127.0.0.1:8080/v1/tenants/1/stats"
	@echo "  curl -i 'http://127.0.0.1:8080/v1/tenants/1/dispatches?limit=5'"
	@echo "  curl -i http://127.0.0.1:8080/v1/dispatches/1"
	@echo "  curl -i http://127.0.0.1:8080/v1/manifests/data-privacy-2004-4th.zip"
	@echo "  curl http://127.0.0.1:8081/health/detailed ; curl http://127.0.0.1:8081/metrics"
	@echo
	$(RUN_ENV) ./bin/cachecar serve

test: check-go services node-stores promtool pgbouncer
	$(TEST_ENV) CACHECAR_TEST_NODE_STORES=$$([ -d $(NODE_STORES)/node_modules ] && echo '$(CURDIR)/$(NODE_STORES)') \
		go test $(GO_TEST_FLAGS) ./...

# node-stores installs the pinned Node session stores (npm ci) when Node.js 20+ is present;
# without it the rolling-migration tests skip and say why.
# promtool checks deploy/prometheus/alerts.yaml in the tests (TestDeployPromtool; with CI=true it
# must be there). Only the one binary is taken from Debian's prometheus package: the package
# itself pulls ~330 MB (mostly JavaScript for its web UI) and, where systemd runs, starts a
# Prometheus server on :9090.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
		[ "$$(id -u)" = 0 ] || { echo "promtool missing and not root: apt-get install prometheus, or run as root"; exit 1; }; \
		echo "installing promtool from Debian's prometheus package"; \
		tmp=$$(mktemp -d) && cd "$$tmp" && apt-get update -qq && apt-get download -qq prometheus 2>/dev/null && \
		dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > /usr/local/bin/promtool && \
		chmod 755 /usr/local/bin/promtool && cd / && rm -rf "$$tmp"; }

# Debian's package would start a PgBouncer service on port 6432: a policy-rc.d that denies
# service starts (the one container images ship) is put in place for the install if there is
# none (and removed however the install ends), and the service is disabled for later boots.
pgbouncer:
	@test -x $(PGBOUNCER) || { \
		[ "$$(id -u)" = 0 ] || { echo "pgbouncer missing and not root: apt-get install pgbouncer, or run as root"; exit 1; }; \
		echo "installing pgbouncer (for the tests of cachecar behind a pooler; its service is neither started nor enabled)"; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			trap 'rm -f /usr/sbin/policy-rc.d' EXIT INT TERM; \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d; \
		fi; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null || exit 1; \
		systemctl disable pgbouncer >/dev/null 2>&1; update-rc.d pgbouncer disable >/dev/null 2>&1; true; }

node-stores:
	@if command -v node >/dev/null 2>&1 && [ "$$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ]; then \
		npm ci --prefix $(NODE_STORES) --no-audit --no-fund --loglevel=error >/dev/null || { echo "npm ci in $(NODE_STORES) failed"; exit 1; }; \
	else \
		echo "Node.js 20+ not found: the sessions' rolling-migration tests against connect-redis and connect-pg-simple will skip"; \
	fi

build: check-go
	go build -ldflags "-X main.version=$(VERSION)" -o bin/cachecar ./cmd/cachecar

services:
	@bash deploy/local/services.sh up

services-down:
	@bash deploy/local/services.sh down

migrate: build services
	$(RUN_ENV) ./bin/cachecar migrate --reference-schema --demo-data

bench: check-go
	@EXTRA_PACKAGES=wrk bash deploy/local/services.sh up
	@$(MAKE) --no-print-directory migrate
	$(RUN_ENV) CACHECAR_BIN=bin/cachecar bash bench/run.sh
	@echo "[bench] Go benchmarks of the hit path (time and allocations per read) and the ETag:"
	$(TEST_ENV) go test -run '^$$' -bench 'Hit|ETag' -benchmem -count 1 ./cachepolicy/

vet: check-go
	go vet ./...
	@test -z "$$(gofmt -l $$(git ls-files -co --exclude-standard '*.go'))" || { gofmt -l $$(git ls-files -co --exclude-standard '*.go'); echo "gofmt: files above need formatting"; exit 1; }

check-go:
	@command -v go >/dev/null 2>&1 || { echo "Go 1.26 is required (expected at /usr/local/go/bin/go)"; exit 1; }

clean:
	rm -rf bin var/bench $(NODE_STORES)/node_modules
