// A real OpenID provider (npm `oidc-provider`) for the gateway's integration
// tests. It is not a stub: discovery, JWKS, client authentication and JWT
// access tokens all come from oidc-provider itself, signed with this
// process's own keys.
//
// Usage:
//   node provider.js --config CONFIG.json [--host IP] [--port N] [--keys JWKS.json] [--exit-on-stdin-eof]
//
// --host defaults to 127.0.0.1 (tests may pass an address inside a test
// network namespace they made); --port defaults to 0 (any free port).
// --exit-on-stdin-eof: exit when stdin closes, so a driver that dies (even by
// SIGKILL) leaves no provider behind.
//
// CONFIG.json:
//   {
//     "clients": [
//       { "client_id": "ci-browser", "client_secret": "s3cret",
//         "claims": { "groups": ["browser-executor"] },   // added to its access tokens
//         "ttl": 2 }                                       // optional, overrides the resource TTL
//     ],
//     "resources": [                                       // first one is the default resource
//       { "audience": "https://gateway.test", "scope": "egress", "ttl": 300, "alg": "RS256" }
//     ]
//   }
//
// Without --keys the provider generates an RSA, a P-256 and an Ed25519 key at
// start. With --keys it loads a private JWKS from that file and re-reads it on
// SIGHUP. Without --keys, SIGHUP rotates (new keys first, old ones kept).
//
// Once listening it prints exactly one line to stdout:
//   {"ready":true,"issuer":"http://127.0.0.1:PORT"}
// Everything else goes to stderr.
//
// Test-only endpoints (never part of a real IdP):
//   POST /test/mint    sign arbitrary claims with the provider's current key
//                      (a stand-in for a CI system's job token issuer).
//                      Body: { "claims": {...}, "alg": "RS256"|"PS256"|"ES256"|"EdDSA"|"HS256"|"none",
//                              "foreign_key": false, "kid": "override", "ttl": 300 }
//                      Defaults: iss = this issuer, iat = now, exp = now + ttl.
//                      Answer:   { "token": "..." }
//   POST /test/rotate  new signing keys, first in the JWKS. Body: { "keep_old": true }
//                      Answer:   { "kids": [...] }
//   GET  /test/kids    { "kids": [...] } current kids, signing key first.

import { createServer } from 'node:http';
import { createPrivateKey, generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import process from 'node:process';

import Provider from 'oidc-provider';
import { SignJWT, importJWK } from 'jose';

function parseArgs(argv) {
  const args = { host: '127.0.0.1', port: 0, config: undefined, keys: undefined, stdinEof: false };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[i + 1];
    switch (flag) {
      case '--port': args.port = Number(value); i++; break;
      case '--host': args.host = value; i++; break;
      case '--config': args.config = value; i++; break;
      case '--keys': args.keys = value; i++; break;
      case '--exit-on-stdin-eof': args.stdinEof = true; break;
      default:
        // A bare number is the port, for `node provider.js 0`.
        if (/^\d+$/.test(flag)) { args.port = Number(flag); break; }
        die(`unknown argument ${flag}; usage: node provider.js --config FILE [--host IP] [--port N] [--keys FILE] [--exit-on-stdin-eof]`);
    }
  }
  if (!Number.isInteger(args.port) || args.port < 0 || args.port > 65535) {
    die(`--port must be 0..65535, got ${args.port}`);
  }
  return args;
}

function die(message) {
  process.stderr.write(`provider.js: ${message}\n`);
  process.exit(2);
}

function log(message) {
  process.stderr.write(`provider.js: ${message}\n`);
}

function readJson(path, what) {
  try {
    return JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    return die(`cannot read ${what} ${path}: ${err.message}`);
  }
}

let generation = 0;

// A fresh private key as a JWK. The key leaves the generator as PEM and is
// parsed again before the JWK export: exporting the generator's own
// KeyObject can deadlock Node 20 (a garbage collection during the export
// runs the finished generator job's destructor, which takes the key's lock
// the export already holds; seen as a provider that never became ready).
function newJwk(type, options) {
  const { privateKey } = generateKeyPairSync(type, {
    ...options,
    publicKeyEncoding: { type: 'spki', format: 'pem' },
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
  });
  return createPrivateKey(privateKey).export({ format: 'jwk' });
}

// One RSA key (RS256 and PS256), one P-256 key (ES256) and one Ed25519 key
// (EdDSA), with kids that say which rotation generation they belong to.
function generateKeys(foreign = false) {
  const tag = foreign ? `foreign-${randomBytes(3).toString('hex')}` : `${++generation}-${randomBytes(3).toString('hex')}`;
  const rsa = newJwk('rsa', { modulusLength: 2048 });
  const ec = newJwk('ec', { namedCurve: 'P-256' });
  const ed = newJwk('ed25519', {});
  return [
    { ...rsa, kid: `rsa-${tag}`, use: 'sig' },
    { ...ec, kid: `ec-${tag}`, use: 'sig', alg: 'ES256' },
    { ...ed, kid: `ed-${tag}`, use: 'sig' },
  ];
}

function loadKeys(path) {
  const jwks = readJson(path, 'keys file');
  if (!jwks || !Array.isArray(jwks.keys) || jwks.keys.length === 0) {
    die(`keys file ${path} must be a JWKS object with a non-empty "keys" array of private keys`);
  }
  return jwks.keys;
}

// Startup phases go to stderr with their time since the process started, so
// a driver that gives up waiting can tell where a slow start spent it.
const phase = (what) => log(`${what} at ${Math.round(performance.now())} ms`);
phase('modules loaded');

const args = parseArgs(process.argv.slice(2));
if (!args.config) die('--config FILE is required');
const config = readJson(args.config, 'config');
const clients = config.clients ?? [];
const resources = config.resources ?? [];
if (!Array.isArray(clients) || !Array.isArray(resources) || resources.length === 0) {
  die('config needs "clients" (array) and "resources" (non-empty array)');
}
for (const r of resources) {
  if (typeof r.audience !== 'string' || !URL.canParse(r.audience)) {
    die(`resource audience must be an absolute URI, got ${JSON.stringify(r.audience)}`);
  }
}
const clientById = new Map(clients.map((c) => [c.client_id, c]));

let keys = args.keys ? loadKeys(args.keys) : generateKeys();
// Signs /test/mint tokens with `foreign_key`: same shapes, never in the JWKS.
const foreignKeys = generateKeys(true);
phase('keys generated');

function buildProvider(issuer) {
  const provider = new Provider(issuer, {
    clients: clients.map((c) => ({
      client_id: c.client_id,
      client_secret: c.client_secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_basic',
    })),
    jwks: { keys },
    cookies: { keys: [randomBytes(16).toString('hex')] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // A token request without `resource` still gets a JWT for the first
        // configured resource, so a client that only knows the issuer works.
        defaultResource: async () => resources[0].audience,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, indicator, client) => {
          const resource = resources.find((r) => r.audience === indicator);
          if (!resource) {
            throw new Provider.errors.InvalidTarget(`unknown resource ${indicator}`);
          }
          const perClient = client ? clientById.get(client.clientId) : undefined;
          const info = {
            scope: resource.scope ?? '',
            audience: resource.audience,
            accessTokenFormat: 'jwt',
            accessTokenTTL: perClient?.ttl ?? resource.ttl ?? 300,
          };
          if (resource.alg) info.jwt = { sign: { alg: resource.alg } };
          return info;
        },
      },
    },
    extraTokenClaims: async (_ctx, token) => {
      const c = clientById.get(token.clientId);
      return c?.claims ? { ...c.claims } : undefined;
    },
  });
  provider.on('server_error', (_ctx, err) => log(`server_error: ${err.stack ?? err}`));
  return provider;
}

const b64url = (value) => Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');

function signingKeyFor(set, alg) {
  const kty = { RS256: 'RSA', PS256: 'RSA', ES256: 'EC', EdDSA: 'OKP' }[alg];
  if (!kty) throw new Error(`alg ${alg} is not supported by /test/mint`);
  const key = set.find((k) => k.kty === kty && (!k.alg || k.alg === alg));
  if (!key) throw new Error(`no ${kty} key for ${alg}`);
  return key;
}

async function mint(issuer, body) {
  const now = Math.floor(Date.now() / 1000);
  const alg = body.alg ?? 'RS256';
  const payload = {
    iss: issuer,
    iat: now,
    exp: now + (body.ttl ?? 300),
    ...body.claims,
  };
  // Explicit nulls remove a default claim (e.g. "exp": null for a token without exp).
  for (const [k, v] of Object.entries(payload)) if (v === null) delete payload[k];

  if (alg === 'none') {
    const header = { alg: 'none', typ: 'JWT', ...(body.kid ? { kid: body.kid } : {}) };
    return `${b64url(header)}.${b64url(payload)}.`;
  }
  if (alg.startsWith('HS')) {
    // Key confusion attempt: HMAC keyed with the public RSA modulus.
    const rsa = signingKeyFor(keys, 'RS256');
    const secret = new TextEncoder().encode(rsa.n);
    return new SignJWT(payload)
      .setProtectedHeader({ alg, typ: 'JWT', kid: body.kid ?? rsa.kid })
      .sign(secret);
  }
  const key = signingKeyFor(body.foreign_key ? foreignKeys : keys, alg);
  // A foreign key claims the provider's own kid by default, so the verifier
  // has to catch it by the signature, not by an unknown kid.
  const kid = body.kid ?? (body.foreign_key ? signingKeyFor(keys, alg).kid : key.kid);
  const privateKey = await importJWK(key, alg);
  return new SignJWT(payload).setProtectedHeader({ alg, typ: 'JWT', kid }).sign(privateKey);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      try {
        resolve(text ? JSON.parse(text) : {});
      } catch (err) {
        reject(new Error(`request body is not JSON: ${err.message}`));
      }
    });
    req.on('error', reject);
  });
}

function reply(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

let issuer;
let provider;
let handler;

function install(newKeys, reason) {
  keys = newKeys;
  provider = buildProvider(issuer);
  handler = provider.callback();
  log(`${reason}: signing kids ${keys.map((k) => k.kid).join(', ')}`);
}

async function testEndpoint(req, res) {
  try {
    if (req.method === 'POST' && req.url === '/test/mint') {
      const body = await readBody(req);
      return reply(res, 200, { token: await mint(issuer, body) });
    }
    if (req.method === 'POST' && req.url === '/test/rotate') {
      const body = await readBody(req);
      const fresh = generateKeys();
      install(body.keep_old === false ? fresh : [...fresh, ...keys], 'rotated');
      return reply(res, 200, { kids: keys.map((k) => k.kid) });
    }
    if (req.method === 'GET' && req.url === '/test/kids') {
      return reply(res, 200, { kids: keys.map((k) => k.kid) });
    }
    return reply(res, 404, { error: `no test endpoint ${req.method} ${req.url}` });
  } catch (err) {
    return reply(res, 400, { error: err.message });
  }
}

const server = createServer((req, res) => {
  if (req.url.startsWith('/test/')) {
    testEndpoint(req, res);
  } else {
    handler(req, res);
  }
});

process.on('SIGHUP', () => {
  if (args.keys) {
    install(loadKeys(args.keys), `reloaded ${args.keys}`);
  } else {
    install([...generateKeys(), ...keys], 'rotated');
  }
});
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
if (args.stdinEof) {
  // The driver holds our stdin; when it goes away (even by SIGKILL) so do we.
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}

server.listen(args.port, args.host, () => {
  const { address, family, port } = server.address();
  issuer = family === 'IPv6' ? `http://[${address}]:${port}` : `http://${address}:${port}`;
  phase('listening');
  install(keys, 'listening');
  process.stdout.write(`${JSON.stringify({ ready: true, issuer })}\n`);
});
server.on('error', (err) => die(`cannot listen on ${args.host}:${args.port}: ${err.message}`));
