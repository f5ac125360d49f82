package testenv

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/ory/dockertest/v3"
	"github.com/valkey-io/valkey-go"
)

// Containers started through dockertest are shared by every test of one package run and expire
// by themselves, so that a crashed test run leaves nothing behind for long.
var (
	dockerOnce sync.Once
	dockerPool *dockertest.Pool

	pgOnce   sync.Once
	pgURL    string
	vkOnce   sync.Once
	vkAddr   string
	expireIn = uint(600)
)

func docker() *dockertest.Pool {
	dockerOnce.Do(func() {
		p, err := dockertest.NewPool("")
		if err != nil {
			return
		}
		if err := p.Client.Ping(); err != nil {
			return
		}
		p.MaxWait = 60 * time.Second
		dockerPool = p
	})
	return dockerPool
}

// dockerPostgres starts postgres:15 once and returns its URL, or "" without Docker.
func dockerPostgres(t interface{ Logf(string, ...any) }) string {
	pgOnce.Do(func() {
		p := docker()
		if p == nil {
			return
		}
		res, err := p.RunWithOptions(&dockertest.RunOptions{
			Repository: "postgres", Tag: "15",
			Env: []string{"POSTGRES_PASSWORD=cachecar", "POSTGRES_USER=cachecar", "POSTGRES_DB=cachecar_test"},
		})
		if err != nil {
			t.Logf("dockertest postgres: %v", err)
			return
		}
		res.Expire(expireIn)
		u := fmt.Sprintf("postgres://cachecar:cachecar@%s/cachecar_test?sslmode=disable", res.GetHostPort("5432/tcp"))
		err = p.Retry(func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			c, err := pgx.Connect(ctx, u)
			if err != nil {
				return err
			}
			return c.Close(ctx)
		})
		if err != nil {
			t.Logf("dockertest postgres did not come up: %v", err)
			return
		}
		pgURL = u
	})
	return pgURL
}

// dockerValkey starts valkey/valkey:8 once and returns its address, or "" without Docker.
func dockerValkey(t interface{ Logf(string, ...any) }) string {
	vkOnce.Do(func() {
		p := docker()
		if p == nil {
			return
		}
		res, err := p.RunWithOptions(&dockertest.RunOptions{Repository: "valkey/valkey", Tag: "8"})
		if err != nil {
			t.Logf("dockertest valkey: %v", err)
			return
		}
		res.Expire(expireIn)
		addr := res.GetHostPort("6379/tcp")
		err = p.Retry(func() error {
			c, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true})
			if err != nil {
				return err
			}
			c.Close()
			return nil
		})
		if err != nil {
			t.Logf("dockertest valkey did not come up: %v", err)
			return
		}
		vkAddr = addr
	})
	return vkAddr
}
