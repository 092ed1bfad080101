#!/usr/bin/env node
'use strict';
// Serves a direct method with the official Node SDK (MQTT or AMQP: --transport).
//   EDGEHUB_CS=... EDGEHUB_CA=ca.pem node method.js [--transport amqp] --method NAME
//     [--status 200] [--count N]
// client.onMethod(NAME): prints {"event":"ready"} once the handler is set (the SDK subscribes
// or attaches its method links right after: a caller gives a connect timeout), one line per
// request {"rid","name","payload","ms"}, and answers each with response.send(status,
// {"echo": payload, "by": <own module id>, "method": NAME}) ({"event":"answered"} once the
// SDK sent it). With --count N it exits 0 after N requests, else at --timeout. Exit codes:
// harness.js.
//   ... node method.js --edge-env --invoke --device D --module M [--method NAME]
//     [--payload JSON] [--call-connect-timeout S] [--response-timeout S]
// As the caller: ModuleClient.invokeMethod(D, M, {methodName, payload,
// responseTimeoutInSeconds, connectTimeoutInSeconds}) through the gateway host (HTTPS, 443);
// prints {"ok":true,"response":<the hub's JSON>} or {"ok":false,"status":<HTTP status>,
// "error":"..."} and exits 0 either way.
const h = require('./harness');

const SPEC = {
  method: { type: 'string', default: 'ping' },
  status: { type: 'number', default: 200 },
  count: { type: 'number', default: 0 },
  invoke: { type: 'flag', default: false },
  device: { type: 'string', default: '' },
  module: { type: 'string', default: '' },
  payload: { type: 'string', default: 'null' },
  call_connect_timeout: { type: 'number', default: 0 },
  response_timeout: { type: 'number', default: 30 },
};

async function invoke(args) {
  const deadline = new h.Deadline(args.timeout);
  const client = await h.createClient(args);
  const params = {
    methodName: args.method,
    payload: JSON.parse(args.payload),
    responseTimeoutInSeconds: args.response_timeout,
    connectTimeoutInSeconds: args.call_connect_timeout,
  };
  const called = new Promise((resolve) => {
    client.invokeMethod(args.device, args.module, params, (err, result) => {
      if (err) {
        const status = (err.response && err.response.statusCode) || err.statusCode || 0;
        h.emit({ ok: false, status, error: String(err), ms: h.elapsedMs() });
      } else {
        h.emit({ ok: true, response: result, ms: h.elapsedMs() });
      }
      resolve();
    });
  });
  await deadline.run(called, 'the invokeMethod answer');
  await h.close(client, args);
}

function ownModule() {
  for (const p of (process.env.EDGEHUB_CS || '').split(';')) {
    if (p.startsWith('ModuleId=')) return p.slice('ModuleId='.length);
  }
  return null;
}

async function run(args) {
  if (args.invoke) {
    await invoke(args);
    return;
  }
  const deadline = new h.Deadline(args.timeout);
  const client = await h.createClient(args);
  await h.connect(client, args, deadline);
  let seen = 0;
  let done;
  const finished = new Promise((r) => { done = r; });
  client.onMethod(args.method, (request, response) => {
    seen += 1;
    let payload = request.payload;
    if (Buffer.isBuffer(payload)) payload = payload.toString();
    if (typeof payload === 'string') {
      try { payload = JSON.parse(payload); } catch (_) { /* kept as text */ }
    }
    h.emit({ rid: request.requestId, name: request.methodName, payload, ms: h.elapsedMs() });
    const body = { echo: payload, by: ownModule(), method: request.methodName };
    response.send(args.status, body, (err) => {
      if (err) {
        process.stderr.write(`response.send failed: ${err}\n`);
      } else {
        h.emit({ event: 'answered', rid: request.requestId, ms: h.elapsedMs() });
      }
      if (args.count && seen >= args.count) done();
    });
  });
  h.emit({ event: 'ready', ms: h.elapsedMs() });
  if (args.count) {
    await deadline.run(finished, `${args.count} requests`);
  } else {
    await new Promise((r) => setTimeout(r, deadline.left() * 1000));
  }
  h.emit({ event: 'done', requests: seen });
  await h.close(client, args);
}

h.main(SPEC, run);
