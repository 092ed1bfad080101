'use strict';
// Shared plumbing of the Node SDK scripts (send.js, receive.js, connect_only.js). Same contract
// as tests/sdk/python/harness.py: env EDGEHUB_CS / EDGEHUB_CA, JSON lines on stdout ("event"
// lines for status), one last stderr line `edgehub-sdk <script>: error=<kind> exit=<code>: ...`
// on failure, and these exit codes:
const EXIT = { OK: 0, OTHER: 1, USAGE: 2, CONNECT: 3, AUTH: 4, TIMEOUT: 5, TLS: 6 };
const KIND = { 1: 'other', 2: 'usage', 3: 'connect', 4: 'auth', 5: 'timeout', 6: 'tls' };

const fs = require('fs');
const path = require('path');
const { createRequire } = require('module');

const SCRIPT = path.basename(process.argv[1] || 'sdk');
const t0 = process.hrtime.bigint();

class Failure extends Error {
  constructor(code, detail) {
    super(detail);
    this.code = code;
    this.detail = detail;
  }
}

function elapsedMs() {
  return Number((process.hrtime.bigint() - t0) / 1000000n);
}

// The SDK lives outside the repository: ${EDGEHUB_SDK_DIR}/node/node_modules (scripts/install-sdks.sh).
function sdkRequire(name) {
  const dir = path.join(process.env.EDGEHUB_SDK_DIR || '/var/tmp/edgehub-sdk', 'node');
  try {
    return createRequire(path.join(dir, 'package.json'))(name);
  } catch (e) {
    throw new Failure(EXIT.USAGE, `cannot load ${name} from ${dir}/node_modules (run scripts/install-sdks.sh): ${e.message}`);
  }
}

// stdout is a pipe in tests: process.stdout.write is asynchronous there, so exit() waits for
// the writes to drain before leaving.
function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

let exiting = false;
function finish(code, detail) {
  if (exiting) return;
  exiting = true;
  if (code !== EXIT.OK) {
    process.stderr.write(`edgehub-sdk ${SCRIPT}: error=${KIND[code] || 'other'} exit=${code}: ${detail}\n`);
  }
  // Leave once stdout and stderr have drained: the SDK's timers must not keep us alive.
  let pending = 2;
  const done = () => { if (--pending === 0) process.exit(code); };
  process.stdout.write('', done);
  process.stderr.write('', done);
  setTimeout(() => process.exit(code), 2000).unref();
}

// A tiny argv parser: --name value, --flag, repeatable --prop k=v.
function parseArgs(spec) {
  const args = {};
  for (const [k, v] of Object.entries(spec)) args[k] = v.default;
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Failure(EXIT.USAGE, `unexpected argument ${a}`);
    const key = a.slice(2).replace(/-/g, '_');
    const s = spec[key];
    if (!s) throw new Failure(EXIT.USAGE, `unknown option ${a}`);
    if (s.type === 'flag') { args[key] = true; continue; }
    if (i + 1 >= argv.length) throw new Failure(EXIT.USAGE, `${a} wants a value`);
    const raw = argv[++i];
    let val = raw;
    if (s.type === 'number') {
      val = Number(raw);
      if (!Number.isFinite(val)) throw new Failure(EXIT.USAGE, `${a} wants a number, got ${raw}`);
    }
    if (s.type === 'list') { args[key] = (args[key] || []).concat([raw]); continue; }
    args[key] = val;
  }
  return args;
}

const COMMON = {
  timeout: { type: 'number', default: 30 },
  connect_timeout: { type: 'number', default: undefined },
  no_retry: { type: 'flag', default: false },
  edge_env: { type: 'flag', default: false },
  keep_alive: { type: 'number', default: undefined },
  no_shutdown: { type: 'flag', default: false },
  transport: { type: 'string', default: 'mqtt' },
  verbose: { type: 'flag', default: false },
};

function readCa() {
  const p = process.env.EDGEHUB_CA;
  if (!p) throw new Failure(EXIT.USAGE, 'EDGEHUB_CA (path of the CA PEM file) is not set');
  let pem;
  try {
    pem = fs.readFileSync(p, 'ascii');
  } catch (e) {
    throw new Failure(EXIT.USAGE, `cannot read EDGEHUB_CA=${p}: ${e.message}`);
  }
  if (!pem.includes('BEGIN CERTIFICATE')) throw new Failure(EXIT.USAGE, `EDGEHUB_CA=${p} holds no PEM certificate`);
  return pem;
}

function idsFromCs(cs) {
  const parts = {};
  for (const p of (cs || '').split(';')) {
    const i = p.indexOf('=');
    if (i > 0) parts[p.slice(0, i)] = p.slice(i + 1);
  }
  return { device: parts.DeviceId || null, module: parts.ModuleId || null };
}

function transportCtor(args) {
  if (args.transport === 'mqtt') return sdkRequire('azure-iot-device-mqtt').Mqtt;
  if (args.transport === 'amqp') return sdkRequire('azure-iot-device-amqp').Amqp;
  throw new Failure(EXIT.USAGE, `--transport is mqtt or amqp, not ${args.transport}`);
}

// ModuleClient.fromConnectionString(cs, Mqtt) + setOptions({ca, keepalive}) (+ NoRetry); with
// --edge-env, ModuleClient.fromEnvironment(Mqtt): the module environment IoT Edge (or the
// Kubernetes controller) sets, EDGEHUB_CS and EDGEHUB_CA unread.
async function createClient(args) {
  const { ModuleClient } = sdkRequire('azure-iot-device');
  const common = sdkRequire('azure-iot-common');
  if (args.edge_env) {
    let client;
    try {
      client = await ModuleClient.fromEnvironment(transportCtor(args));
    } catch (e) {
      if (e instanceof Failure) throw e;
      throw new Failure(EXIT.USAGE, `ModuleClient.fromEnvironment failed: ${describeError(e)}`);
    }
    if (args.keep_alive !== undefined) await client.setOptions({ keepalive: args.keep_alive });
    if (args.no_retry) client.setRetryPolicy(new common.NoRetry());
    client.on('error', () => {});
    return client;
  }
  const cs = process.env.EDGEHUB_CS;
  if (!cs) throw new Failure(EXIT.USAGE, 'EDGEHUB_CS is not set');
  if (!cs.includes('GatewayHostName=')) throw new Failure(EXIT.USAGE, 'EDGEHUB_CS has no GatewayHostName=: it would dial HostName');
  const ca = readCa();
  let client;
  try {
    client = ModuleClient.fromConnectionString(cs, transportCtor(args));
  } catch (e) {
    if (e instanceof Failure) throw e;
    throw new Failure(EXIT.USAGE, `SDK refused the connection string: ${e.name}: ${e.message}`);
  }
  const opts = { ca };
  if (args.keep_alive !== undefined) opts.keepalive = args.keep_alive;
  await client.setOptions(opts);
  if (args.no_retry) client.setRetryPolicy(new common.NoRetry());
  // An 'error' event with no listener would throw out of the event loop; report it instead.
  client.on('error', (err) => {
    if (args.verbose) process.stderr.write(`client error event: ${describeError(err)}\n`);
  });
  client.on('disconnect', (err) => {
    if (args.verbose) process.stderr.write(`client disconnect event: ${err ? describeError(err) : ''}\n`);
  });
  return client;
}

function describeError(e) {
  const chain = [];
  let cur = e;
  while (cur && chain.length < 4) {
    chain.push(`${cur.name || 'Error'}: ${cur.message || String(cur)}`);
    cur = cur.transportError || cur.innerError || cur.cause;
  }
  return chain.join(' <- ');
}

// The Node MQTT transport turns EVERY failure of the first connection into an UnauthorizedError
// ("Failure on first connection (Not authorized): <cause>"), a refused TCP connection included;
// so the class name alone does not tell auth from network: the cause's text does.
const AUTH_TEXT = /Connection refused: (Not authorized|Bad username or password|Identifier rejected)|put-token|status-code/i;
const TLS_TEXT = /certificate|self[- ]signed|unable to verify|altnames|ERR_TLS|SSL routines|wrong version number|handshake/i;
const NET_TEXT = /ECONNREFUSED|ENETUNREACH|ECONNRESET|EHOSTUNREACH|ETIMEDOUT|EPIPE|socket hang up|premature close|client disconnecting|connection disconnected|Server unavailable/i;

function classify(e) {
  if (e instanceof Failure) return [e.code, e.detail];
  const detail = describeError(e);
  const names = [];
  for (let cur = e; cur && names.length < 4; cur = cur.transportError || cur.innerError || cur.cause) {
    names.push(cur.name || (cur.constructor && cur.constructor.name) || '');
  }
  const cause = detail.split('Failure on first connection (Not authorized): ').join('');
  if (AUTH_TEXT.test(cause)) return [EXIT.AUTH, detail];
  if (TLS_TEXT.test(cause)) return [EXIT.TLS, detail];
  if (NET_TEXT.test(cause)) return [EXIT.CONNECT, detail];
  if (names.includes('UnauthorizedError')) return [EXIT.AUTH, detail];
  if (names.some((n) => ['NotConnectedError', 'ServiceUnavailableError', 'DeviceNotFoundError'].includes(n))) {
    return [EXIT.CONNECT, detail];
  }
  if (names.includes('TimeoutError')) return [EXIT.TIMEOUT, detail];
  return [EXIT.OTHER, detail + (e && e.stack ? `\n${e.stack}` : '')];
}

class Deadline {
  constructor(seconds) {
    this.end = Date.now() + seconds * 1000;
  }
  left() {
    return Math.max(0, (this.end - Date.now()) / 1000);
  }
  run(promise, what, cap) {
    const left = cap === undefined ? this.left() : Math.min(this.left(), cap);
    let timer;
    const t = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Failure(EXIT.TIMEOUT, `${what}: no answer within the deadline (${left.toFixed(1)}s left)`)), left * 1000);
    });
    return Promise.race([promise, t]).finally(() => clearTimeout(timer));
  }
}

// Runs op() (a promise factory) until it succeeds, retrying as a module does when it failed only
// because the connection was down or dropped (the hub restarting; classify() says "connect"):
// 0.1 s doubling to 2 s between attempts, within the deadline, one {"event":"retry"} line each.
// With --no-retry, or for any other error, it fails at once.
async function withRetry(op, args, deadline, what) {
  let pause = 0.1;
  for (let attempt = 1; ; attempt++) {
    try {
      return await deadline.run(op(), what);
    } catch (e) {
      if (e instanceof Failure || args.no_retry || classify(e)[0] !== EXIT.CONNECT || deadline.left() <= pause) throw e;
      emit({ event: 'retry', what, attempt, error: (e && e.name) || 'Error', ms: elapsedMs() });
      await new Promise((r) => setTimeout(r, pause * 1000));
      pause = Math.min(2, pause * 2);
    }
  }
}

async function connect(client, args, deadline) {
  await deadline.run(client.open(), 'connect', args.connect_timeout);
  const ids = idsFromCs(process.env.EDGEHUB_CS || process.env.EdgeHubConnectionString);
  emit({ event: 'connected', sdk: 'node', transport: args.transport, device_id: ids.device, module_id: ids.module, ms: elapsedMs() });
}

async function close(client, args) {
  if (args.no_shutdown) return;
  try {
    await new Deadline(5).run(client.close(), 'close');
  } catch (_) {
    // the work is done and reported
  }
}

function main(spec, run) {
  process.on('unhandledRejection', (e) => { const [c, d] = classify(e); finish(c, `unhandled rejection: ${d}`); });
  process.on('uncaughtException', (e) => { const [c, d] = classify(e); finish(c, `uncaught exception: ${d}`); });
  let args;
  try {
    args = parseArgs(Object.assign({}, COMMON, spec));
  } catch (e) {
    const [c, d] = classify(e);
    finish(c, d);
    return;
  }
  // The AMQP transport sets a TLS ServerName of 127.0.0.1, which Node warns about (DEP0123).
  if (!args.verbose) process.noDeprecation = true;
  if (args.verbose && !process.env.DEBUG) {
    // the SDK logs through the debug package; it reads DEBUG when first loaded
    process.env.DEBUG = 'azure*,mqtt*,rhea*';
  }
  run(args).then(() => finish(EXIT.OK), (e) => { const [c, d] = classify(e); finish(c, d); });
}

function parseProps(list) {
  const props = [];
  for (const p of list || []) {
    const i = p.indexOf('=');
    if (i < 0) throw new Failure(EXIT.USAGE, `--prop wants key=value, got ${p}`);
    props.push([p.slice(0, i), p.slice(i + 1)]);
  }
  return props;
}

module.exports = {
  EXIT, Failure, Deadline, emit, finish, elapsedMs, sdkRequire, createClient, connect, close, main, parseProps, withRetry,
};
