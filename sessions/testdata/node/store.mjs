#!/usr/bin/env node
// Drives the REAL Node session stores used by Express apps (connect-redis,
// connect-pg-simple) through the express-session Store API, one operation per
// run, so Go integration tests can prove cachecar reads and writes the same
// bytes during a rolling migration.
//
// Usage:
//   node store.mjs <redis|pg> <set|get|touch|destroy> <sid> [session-json]
//
// session-json is required for set and touch; "-" reads it from stdin.
// It is parsed with JSON.parse, as express-session would hand the store a
// plain object (cookie.expires may be an ISO string).
//
// Environment:
//   REDIS_URL     redis store URL (default redis://127.0.0.1:6379)
//   SESS_PREFIX   connect-redis key prefix (default "sess:"; "" is allowed)
//   SESS_TTL      seconds; passed as the store's ttl option only when set
//   DATABASE_URL  pg connection string (connect-pg-simple conString)
//   PG_TABLE      connect-pg-simple tableName (default "session")
//   PG_SCHEMA     connect-pg-simple schemaName (optional)
//   STORE_TIMEOUT_MS  harness safety timeout (default 10000)
//
// Output: exactly one JSON line on stdout:
//   {"ok":true}                      set / touch / destroy
//   {"ok":true,"session":<obj|null>} get
//   {"ok":false,"error":"..."}       any failure (exit status 1)

import session from "express-session";
import { RedisStore } from "connect-redis";
import { createClient } from "redis";
import connectPgSimple from "connect-pg-simple";

const USAGE =
  "usage: node store.mjs <redis|pg> <set|get|touch|destroy> <sid> [session-json|-]";

let finished = false;

function finish(code, obj) {
  if (finished) return;
  finished = true;
  process.stdout.write(JSON.stringify(obj) + "\n", () => process.exit(code));
}

function fail(err) {
  const msg = err instanceof Error ? err.message || String(err) : String(err);
  finish(1, { ok: false, error: msg });
}

async function readStdin() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return Buffer.concat(chunks).toString("utf8");
}

function parseTTL() {
  const raw = process.env.SESS_TTL;
  if (raw === undefined || raw === "") return undefined;
  const n = Number(raw);
  if (!Number.isFinite(n)) throw new Error(`SESS_TTL is not a number: ${raw}`);
  return n;
}

// Wrap a callback-style express-session Store method in a promise.
function call(store, method, ...args) {
  return new Promise((resolve, reject) => {
    store[method](...args, (err, data) => (err ? reject(err) : resolve(data)));
  });
}

async function openRedis(ttl) {
  const client = createClient({
    url: process.env.REDIS_URL || "redis://127.0.0.1:6379",
    // Fail fast instead of retrying forever; no effect on what is stored.
    socket: { reconnectStrategy: false },
  });
  let clientErr;
  client.on("error", (err) => {
    clientErr = err;
  });
  try {
    await client.connect();
  } catch (err) {
    throw clientErr || err;
  }
  const opts = { client, prefix: process.env.SESS_PREFIX ?? "sess:" };
  if (ttl !== undefined) opts.ttl = ttl;
  const store = new RedisStore(opts);
  const close = async () => {
    if (client.isOpen) await client.close();
  };
  return { store, close };
}

async function openPg(ttl) {
  const PGStore = connectPgSimple(session);
  const opts = {
    tableName: process.env.PG_TABLE || "session",
    createTableIfMissing: false,
    pruneSessionInterval: false,
  };
  if (process.env.DATABASE_URL) opts.conString = process.env.DATABASE_URL;
  if (process.env.PG_SCHEMA) opts.schemaName = process.env.PG_SCHEMA;
  if (ttl !== undefined) opts.ttl = ttl;
  const store = new PGStore(opts);
  // The store owns the pg.Pool it built from conString; close() ends it.
  const close = () => store.close();
  return { store, close };
}

async function main() {
  const [backend, op, sid, sessArg] = process.argv.slice(2);
  if (!["redis", "pg"].includes(backend)) throw new Error(USAGE);
  if (!["set", "get", "touch", "destroy"].includes(op)) throw new Error(USAGE);
  if (sid === undefined || sid === "") throw new Error(USAGE);

  let sess;
  if (op === "set" || op === "touch") {
    if (sessArg === undefined) throw new Error(`${op} needs session-json\n${USAGE}`);
    const text = sessArg === "-" ? await readStdin() : sessArg;
    try {
      sess = JSON.parse(text);
    } catch (err) {
      throw new Error(`invalid session-json: ${err.message}`);
    }
  }

  const ttl = parseTTL();
  const { store, close } = backend === "redis" ? await openRedis(ttl) : await openPg(ttl);

  let result;
  let opErr;
  try {
    switch (op) {
      case "set":
        await call(store, "set", sid, sess);
        result = { ok: true };
        break;
      case "touch":
        await call(store, "touch", sid, sess);
        result = { ok: true };
        break;
      case "destroy":
        await call(store, "destroy", sid);
        result = { ok: true };
        break;
      case "get": {
        const got = await call(store, "get", sid);
        result = { ok: true, session: got ?? null };
        break;
      }
    }
  } catch (err) {
    opErr = err;
  }
  try {
    await close();
  } catch (err) {
    opErr ??= err;
  }
  if (opErr) throw opErr;
  finish(0, result);
}

const timeoutMs = Number(process.env.STORE_TIMEOUT_MS) || 10000;
setTimeout(() => fail(new Error(`timed out after ${timeoutMs}ms`)), timeoutMs);

main().catch(fail);
