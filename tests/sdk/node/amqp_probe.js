#!/usr/bin/env node
'use strict';
// Raw AMQP probes of the hub's AMQP head with rhea (the AMQP library under the Node SDK), for
// what the SDK itself never does. Env EDGEHUB_CS / EDGEHUB_CA as the other scripts; the hub is
// dialled at the connection string's GatewayHostName:5671.
//   node amqp_probe.js --mode attach --sasl none|anonymous|mssbcbs|plain [--other MODULE]
//     [--batch N]
//     authenticates as the connection string's module (through $cbs, or SASL PLAIN with the SAS
//     token as password), then attaches its own events link and sends one message; with
//     --other it also attaches MODULE's events link (sender and receiver) on the same
//     connection; --batch N sends one transfer in the batched format (0x80013700) with N
//     messages (seq 0..N-1, run "batch", output out1) instead of the one message. stdout: {"event":"cbs","status":N}, {"event":"own","outcome":"accepted"},
//     {"event":"other-sender"|"other-receiver","result":"refused"|"attached","condition":...}
//     --expire-in S: the token stays valid S s (with the hub's 300 s skew); --hold S: stay
//     connected S s and print {"event":"held","closed_by_hub_ms":N|null}; --renew-after S:
//     put a fresh token on the open connection after S s ({"event":"renewed",...}); --silent:
//     write nothing more (not even heartbeats) while holding.
//   node amqp_probe.js --mode inputs [--snd-settle unsettled|settled|mixed] [--count N]
//     [--settle none|accept] [--sasl ...]
//     authenticates as above, then attaches the module's inputs link (a receiver on its events
//     address) asking for that sender settle mode, without auto-accept; prints
//     {"event":"attached","snd_settle_mode":N} (what the hub answered: 0 unsettled, 1 settled,
//     2 mixed), then {"event":"message","message_id":...,"presettled":bool} for each of N
//     messages (accepting it with --settle accept, else leaving it unsettled), then closes.
//   node amqp_probe.js --mode inputs-cycle [--cycles N] [--sasl ...]
//     authenticates as above, then N times attaches the module's inputs link and closes it
//     again ({"event":"cycled","n":i} once the hub answered the detach); then attaches two
//     inputs links, closes the first ({"event":"ready"}) and waits for one message on the
//     second ({"event":"message","link":"second","message_id":...}, accepted), then closes.
//   node amqp_probe.js --mode cbs-reattach [--cycles N] [--sasl none|anonymous|mssbcbs]
//     authenticates through $cbs, then N times closes the $cbs reply link, attaches a new one
//     and renews the token: {"event":"reattached","n":i,"status":N|null,"correlated":bool}
//     (status null: the hub closed the new reply link instead of answering).
//   node amqp_probe.js --mode oversize [--sasl none|anonymous|mssbcbs]
//     authenticates through $cbs, then on its events link sends a message whose 120 KiB binary
//     user id becomes 360 KiB of text ({"event":"expanding","outcome":...,"condition":...}),
//     a small one ("after"), one of 700 KiB ("big-event"; "outcome":"detached" if the hub
//     detached the link), then a 64 KiB put-token on $cbs ("big-cbs": "answered" with its
//     "status", or "detached" with the "condition").
//   node amqp_probe.js --mode pipeline [--start-seq S] [--count N] [--sasl ...]
//     authenticates as above, then sends seqs S..S+N-1 (application property seq, output out1,
//     every eighth with a 48 KiB body) on its events link without waiting for settlements;
//     prints {"event":"pipeline","ended":"settled"|"detached"|"closed","sent":K,
//     "accepted_prefix":A} (A: accepted before the first message that was not).
//   node amqp_probe.js --mode twin [--other MODULE] [--sasl ...]
//     authenticates as above; with --other tries MODULE's twin and method links
//     ({"event":"other-twin-sender"|"other-twin-receiver"|"other-methods-sender"|
//     "other-methods-receiver","result":...,"condition":...}); then on its own twin links sends
//     a PATCH of reported properties that is not JSON, one of 40 KiB, a good one and a GET,
//     printing {"event":"twin-reply","what":"malformed"|"oversized"|"good"|"get","status":N,
//     "version":N|null,"body":...} for each, and {"event":"leaked","messages":N} (messages
//     that arrived on --other's receiver links).
//   node amqp_probe.js --mode methods-reattach [--count N] [--sasl ...]
//     authenticates as above, attaches the module's method response link and two method
//     request links, closes the first ({"event":"ready"} once the hub answered the detach),
//     then answers each request arriving on the second with 200 {"via":"second"}
//     ({"event":"request","name":...,"rid":...}) until N were answered ({"event":"done"}).
//   node amqp_probe.js --mode unauthenticated
//     opens an AMQP connection (no SASL) and never authenticates; prints
//     {"event":"closed","how":...,"ms":N} when the hub ends the connection.
//   node amqp_probe.js --mode cbs-flood [--count N]
//     opens an AMQP connection (no SASL), attaches a $cbs sender only and sends N put-tokens
//     at once; prints {"event":"accepted-without-reply-link","n":K} (how many the hub accepted
//     before no more came for 2 s), then attaches the $cbs receiver and prints
//     {"event":"replies","n":N,"in_order":bool,"statuses":[...]} once every reply came.
//   node amqp_probe.js --mode many-links [--count N]
//     opens an AMQP connection (no SASL) and attaches N $cbs sender links on one session at
//     once; prints {"event":"links","attached":A,"refused":R,"conditions":[...]}.
//   node amqp_probe.js --mode garbage
//     opens an AMQP connection (no SASL), then writes bytes that are no AMQP frame on it;
//     prints {"event":"closed","how":...,"ms":N} when the hub ends the connection.
// Exit codes: harness.js (0 ok, 5 timeout, 1 other).
const crypto = require('crypto');
const h = require('./harness');

const SPEC = {
  mode: { type: 'string', default: 'attach' },
  sasl: { type: 'string', default: 'anonymous' },
  other: { type: 'string', default: undefined },
  expire_in: { type: 'number', default: 3600 },
  renew_after: { type: 'number', default: undefined },
  hold: { type: 'number', default: 0 },
  batch: { type: 'number', default: 0 },
  silent: { type: 'flag', default: false },
  snd_settle: { type: 'string', default: 'unsettled' },
  count: { type: 'number', default: 1 },
  settle: { type: 'string', default: 'none' },
  cycles: { type: 'number', default: 3 },
  start_seq: { type: 'number', default: 0 },
};

// Microsoft's batched message format: each data section of the body is an encoded message.
const BATCH_FORMAT = 0x80013700;

function csFields() {
  const f = {};
  for (const p of (process.env.EDGEHUB_CS || '').split(';')) {
    const i = p.indexOf('=');
    if (i > 0) f[p.slice(0, i)] = p.slice(i + 1);
  }
  return f;
}

// The hub accepts a token until se + 300 s (the SAS clock skew): validFor is counted from now
// to the end of that grace.
function sasToken(host, device, module, keyB64, validFor) {
  const sr = encodeURIComponent(`${host}/devices/${device}/modules/${module}`);
  const se = Math.floor(Date.now() / 1000) + validFor - 300;
  const sig = crypto.createHmac('sha256', Buffer.from(keyB64, 'base64')).update(`${sr}\n${se}`).digest('base64');
  return { audience: sr, token: `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}` };
}

function once(emitter, ok, bad, what, deadline) {
  return deadline.run(new Promise((resolve, reject) => {
    emitter.once(ok, (ctx) => resolve(ctx));
    if (bad) emitter.once(bad, (ctx) => reject(new Error(`${what}: ${bad} ${describe(ctx)}`)));
  }), what, 10);
}

function describe(ctx) {
  const e = ctx && (ctx.error || (ctx.sender && ctx.sender.error) || (ctx.receiver && ctx.receiver.error) || (ctx.connection && ctx.connection.error));
  return e ? `${e.condition}: ${e.description}` : '';
}

function linkErrorCondition(link) {
  const e = link.error || (link.remote && link.remote.detach && link.remote.detach.error);
  return e ? e.condition : null;
}

// Attaches a link and reports whether the hub kept it attached or detached it with an error.
function tryAttach(conn, kind, address) {
  return new Promise((resolve) => {
    const link = kind === 'sender' ? conn.open_sender({ target: address }) : conn.open_receiver({ source: address, credit_window: 0 });
    let opened = false;
    const settle = (result) => { clearTimeout(timer); resolve(result); };
    link.once(`${kind}_open`, () => { opened = true; });
    link.once(`${kind}_error`, () => settle({ result: 'refused', condition: linkErrorCondition(link) }));
    link.once(`${kind}_close`, () => settle({ result: 'refused', condition: linkErrorCondition(link) }));
    const timer = setTimeout(() => settle({ result: opened ? 'attached' : 'no-answer', condition: null }), 2000);
  });
}

async function attachMode(args) {
  const rhea = h.sdkRequire('rhea');
  const f = csFields();
  const { audience, token } = sasToken(f.HostName, f.DeviceId, f.ModuleId, f.SharedAccessKey, args.expire_in);
  const deadline = new h.Deadline(args.timeout);
  const container = rhea.create_container();
  const opts = { host: f.GatewayHostName, port: 5671, transport: 'tls', ca: fsRead(process.env.EDGEHUB_CA), reconnect: false };
  if (args.sasl === 'plain') {
    opts.username = `${f.DeviceId}/modules/${f.ModuleId}@sas.${f.HostName}`;
    opts.password = token;
  } else if (args.sasl === 'mssbcbs') {
    // The C SDK's anonymous alias: an empty initial response.
    opts.sasl_mechanisms = { MSSBCBS: () => ({ start: (callback) => callback(undefined, Buffer.alloc(0)) }) };
  } else if (args.sasl === 'none') {
    opts.sasl = { enabled: false }; // no SASL layer: plain AMQP header (as the Node SDK)
  } else {
    opts.username = 'anonymous'; // SASL ANONYMOUS (rhea's default)
  }
  const conn = container.connect(opts);
  await once(conn, 'connection_open', 'connection_error', 'open', deadline);
  const t0 = Date.now();
  const hubClosed = new Promise((resolve) => {
    conn.once('disconnected', () => resolve(Date.now() - t0));
    conn.once('connection_close', () => resolve(Date.now() - t0));
  });
  let putToken = null;
  let cbsTx = null;
  let cbsRx = null;
  if (args.sasl !== 'plain') {
    cbsTx = conn.open_sender({ target: '$cbs' });
    cbsRx = conn.open_receiver({ source: '$cbs' });
    const rxOpen = once(cbsRx, 'receiver_open', 'receiver_error', '$cbs receiver', deadline);
    const txReady = once(cbsTx, 'sendable', 'sender_error', '$cbs sender', deadline);
    await rxOpen;
    await txReady;
    putToken = async (tok, event) => {
      const id = crypto.randomUUID();
      const reply = once(cbsRx, 'message', 'receiver_error', 'put-token reply', deadline);
      cbsTx.send({
        message_id: id, to: '$cbs', reply_to: 'cbs', body: tok,
        application_properties: { operation: 'put-token', type: 'servicebus.windows.net:sastoken', name: audience },
      });
      const msg = (await reply).message;
      const status = msg.application_properties['status-code'];
      h.emit({ event, status, correlated: msg.correlation_id === id, ms: Date.now() - t0 });
      if (status !== 200) throw new h.Failure(h.EXIT.AUTH, `put-token status ${status}`);
    };
    await putToken(token, 'cbs');
  }
  if (args.mode === 'inputs') return inputsMode(args, conn, f, deadline);
  if (args.mode === 'inputs-cycle') return inputsCycleMode(args, conn, f, deadline);
  if (args.mode === 'oversize') return oversizeMode(conn, f, deadline, cbsTx, cbsRx);
  if (args.mode === 'cbs-reattach') return cbsReattachMode(args, conn, f, deadline, cbsTx, cbsRx);
  if (args.mode === 'pipeline') return pipelineMode(args, conn, f, deadline);
  if (args.mode === 'twin') return twinMode(args, conn, f, deadline);
  if (args.mode === 'methods-reattach') return methodsReattachMode(args, conn, f, deadline);
  const own = conn.open_sender({ target: `/devices/${f.DeviceId}/modules/${f.ModuleId}/messages/events` });
  const ownReady = own.sendable() ? Promise.resolve() : once(own, 'sendable', 'sender_error', 'own events link', deadline);
  await ownReady;
  const settlement = (what) => deadline.run(new Promise((resolve) => {
    own.once('accepted', () => resolve('accepted'));
    own.once('rejected', (ctx) => resolve(`rejected ${describe(ctx)}`));
    own.once('released', () => resolve('released'));
  }), what, 10);
  if (args.batch) {
    // One transfer in the batched format carrying --batch messages (what the C# and Java SDKs
    // send for sendOutputEventBatch; the Node SDK does not implement it over AMQP).
    const parts = [];
    for (let seq = 0; seq < args.batch; seq++) {
      parts.push(rhea.message.encode({
        message_id: `batch-${seq}`, content_type: 'application/json', content_encoding: 'utf-8',
        application_properties: { 'iothub-outputname': 'out1', seq: String(seq), run: 'batch', note: 'a b/c&d=e', city: 'Zürich' },
        body: rhea.message.data_section(Buffer.from(JSON.stringify({ seq, run: 'batch' }))),
      }));
    }
    const settled = settlement('batch settlement');
    own.send(rhea.message.encode({ body: rhea.message.data_sections(parts) }), undefined, BATCH_FORMAT);
    h.emit({ event: 'batch', outcome: await settled, messages: args.batch });
  } else {
    const settled = settlement('own message settlement');
    own.send({ message_id: 'probe-1', body: rhea.message.data_section(Buffer.from('{"probe":1}')), application_properties: { 'iothub-outputname': 'probe' } });
    h.emit({ event: 'own', outcome: await settled });
  }
  if (args.other) {
    const address = `/devices/${f.DeviceId}/modules/${args.other}/messages/events`;
    h.emit(Object.assign({ event: 'other-sender' }, await tryAttach(conn, 'sender', address)));
    h.emit(Object.assign({ event: 'other-receiver' }, await tryAttach(conn, 'receiver', address)));
  }
  if (args.silent) {
    // Stop writing anything (heartbeats included), as a client whose network vanished.
    conn.socket.write = () => true;
  }
  if (args.hold) {
    // Stay connected up to --hold s (renewing the token after --renew-after s if asked) and
    // report whether and when the hub closed the connection.
    if (args.renew_after !== undefined && putToken) {
      await new Promise((r) => setTimeout(r, args.renew_after * 1000));
      await putToken(sasToken(f.HostName, f.DeviceId, f.ModuleId, f.SharedAccessKey, 3600).token, 'renewed');
    }
    const left = Math.max(0, args.hold * 1000 - (Date.now() - t0));
    const closedAt = await Promise.race([hubClosed, new Promise((r) => setTimeout(() => r(null), left))]);
    h.emit({ event: 'held', closed_by_hub_ms: closedAt });
  }
  conn.close();
}

// Tries --other's twin and method links (sender and receiver each, the receivers with credit:
// a message on one would be a leak), then on the module's own twin links sends, one at a time,
// a PATCH of reported properties that is not JSON, one of 40 KiB, a good one, and a GET.
async function twinMode(args, conn, f, deadline) {
  const rhea = h.sdkRequire('rhea');
  let leaked = 0;
  if (args.other) {
    const base = `/devices/${f.DeviceId}/modules/${args.other}`;
    for (const [name, address] of [['twin', `${base}/twin`], ['methods', `${base}/methods/devicebound`]]) {
      h.emit(Object.assign({ event: `other-${name}-sender` }, await tryAttach(conn, 'sender', address)));
      const rx = conn.open_receiver({ source: address, credit_window: 16 });
      rx.on('message', () => { leaked += 1; });
      const result = await new Promise((resolve) => {
        let opened = false;
        const done = (r) => { clearTimeout(timer); resolve(r); };
        rx.once('receiver_open', () => { opened = true; });
        rx.once('receiver_error', () => done({ result: 'refused', condition: linkErrorCondition(rx) }));
        rx.once('receiver_close', () => done({ result: 'refused', condition: linkErrorCondition(rx) }));
        const timer = setTimeout(() => done({ result: opened ? 'attached' : 'no-answer', condition: null }), 2000);
      });
      h.emit(Object.assign({ event: `other-${name}-receiver` }, result));
    }
  }
  const address = `/devices/${f.DeviceId}/modules/${f.ModuleId}/twin`;
  const props = { 'com.microsoft:channel-correlation-id': `twin:${crypto.randomUUID()}` };
  const tx = conn.open_sender({ target: address, snd_settle_mode: 1, properties: props });
  const rx = conn.open_receiver({ source: address, snd_settle_mode: 1, properties: props });
  await once(rx, 'receiver_open', 'receiver_error', 'own twin receiver', deadline);
  if (!tx.sendable()) await once(tx, 'sendable', 'sender_error', 'own twin sender', deadline);
  const ask = async (what, operation, resource, body) => {
    const id = crypto.randomUUID();
    const reply = deadline.run(new Promise((resolve) => {
      const onMessage = (ctx) => {
        if (ctx.message.correlation_id !== id) return;
        rx.removeListener('message', onMessage);
        resolve(ctx.message);
      };
      rx.on('message', onMessage);
    }), `${what} answer`, 20);
    const annotations = { operation };
    if (resource) annotations.resource = resource;
    tx.send({ correlation_id: id, message_annotations: annotations, body: rhea.message.data_section(Buffer.from(body)) });
    const m = await reply;
    const ann = m.message_annotations || {};
    const text = m.body && m.body.content ? m.body.content.toString() : '';
    let parsed = null;
    try { parsed = text ? JSON.parse(text) : null; } catch (_) { parsed = text; }
    h.emit({ event: 'twin-reply', what, status: ann.status, version: ann.version === undefined ? null : Number(ann.version), body: parsed });
  };
  await ask('malformed', 'PATCH', '/properties/reported', '{"a": 1, oops');
  await ask('oversized', 'PATCH', '/properties/reported', JSON.stringify({ big: 'x'.repeat(40 * 1024) }));
  await ask('good', 'PATCH', '/properties/reported', '{"ok": true}');
  await ask('get', 'GET', undefined, ' ');
  h.emit({ event: 'leaked', messages: leaked });
  conn.close();
}

// Attaches the module's method links (a response sender and two request receivers), closes
// the first receiver, then answers every request that comes on the second with status 200 and
// {"via":"second"} until --count requests were answered.
async function methodsReattachMode(args, conn, f, deadline) {
  const rhea = h.sdkRequire('rhea');
  const address = `/devices/${f.DeviceId}/modules/${f.ModuleId}/methods/devicebound`;
  const tx = conn.open_sender({ target: address });
  if (!tx.sendable()) await once(tx, 'sendable', 'sender_error', 'method response sender', deadline);
  const first = conn.open_receiver({ source: address });
  await once(first, 'receiver_open', 'receiver_error', 'first method receiver', deadline);
  const second = conn.open_receiver({ source: address });
  await once(second, 'receiver_open', 'receiver_error', 'second method receiver', deadline);
  let answered = 0;
  let done;
  const finished = new Promise((r) => { done = r; });
  second.on('message', (ctx) => {
    const m = ctx.message;
    h.emit({ event: 'request', name: m.application_properties['IoThub-methodname'], rid: m.correlation_id });
    tx.send({
      correlation_id: m.correlation_id,
      application_properties: { 'IoThub-status': 200 },
      body: rhea.message.data_section(Buffer.from('{"via":"second"}')),
    });
    answered += 1;
    if (answered >= args.count) done();
  });
  first.once('message', () => h.emit({ event: 'request-on-first' }));
  const closed = once(first, 'receiver_close', 'receiver_error', 'first method receiver close', deadline);
  first.close();
  await closed;
  h.emit({ event: 'ready' });
  await deadline.run(finished, `${args.count} requests`);
  h.emit({ event: 'done', answered });
  conn.close();
}

// Sends seqs start_seq..start_seq+count-1 on the module's events link without waiting for
// settlements (as far as the hub's credit goes), every eighth with a 48 KiB body, the others
// tiny; then reports each one's outcome in seq order and how many were accepted before the
// first that was not (the link closed by the hub counts as the end).
async function pipelineMode(args, conn, f, deadline) {
  const rhea = h.sdkRequire('rhea');
  const own = conn.open_sender({ target: `/devices/${f.DeviceId}/modules/${f.ModuleId}/messages/events`, autosettle: true });
  await (own.sendable() ? Promise.resolve() : once(own, 'sendable', 'sender_error', 'own events link', deadline));
  const end = args.start_seq + args.count;
  const outcome = new Map();
  const seqOf = new Map();
  let next = args.start_seq;
  let finish;
  const finished = new Promise((resolve) => { finish = resolve; });
  const check = () => { if (outcome.size === next - args.start_seq && next === end) finish('settled'); };
  const record = (what) => (ctx) => {
    const seq = seqOf.get(ctx.delivery.id);
    if (seq !== undefined && !outcome.has(seq)) outcome.set(seq, what);
    check();
  };
  own.on('accepted', record('accepted'));
  own.on('rejected', record('rejected'));
  own.on('released', record('released'));
  own.on('modified', record('modified'));
  for (const ev of ['sender_close', 'sender_error']) own.once(ev, () => finish('detached'));
  for (const ev of ['connection_close', 'disconnected']) conn.once(ev, () => finish('closed'));
  const pump = () => {
    while (next < end && own.sendable()) {
      const seq = next++;
      const body = Buffer.alloc(seq % 8 === 0 ? 48 * 1024 : 0, 0x23);
      const d = own.send({
        message_id: `pipe-${seq}`,
        application_properties: { 'iothub-outputname': 'out1', seq: String(seq), run: 'pipe' },
        body: rhea.message.data_section(Buffer.concat([Buffer.from(`${seq}:`), body])),
      });
      seqOf.set(d.id, seq);
    }
    check();
  };
  own.on('sendable', pump);
  pump();
  const how = await deadline.run(finished, 'pipeline settlements', 60);
  let prefix = 0;
  for (let seq = args.start_seq; seq < end && outcome.get(seq) === 'accepted'; seq++) prefix++;
  h.emit({ event: 'pipeline', ended: how, sent: next - args.start_seq, accepted_prefix: prefix });
  conn.close();
}

// How a sent message ended: its settlement, or its link detached by the hub.
function outcomeOrDetach(link, kind, what, deadline) {
  return deadline.run(new Promise((resolve) => {
    const state = (ctx) => (ctx.delivery && ctx.delivery.remote_state) || {};
    link.once('accepted', () => resolve({ outcome: 'accepted' }));
    link.once('rejected', (ctx) => resolve({ outcome: 'rejected', condition: state(ctx).error ? state(ctx).error.condition : null }));
    link.once('released', () => resolve({ outcome: 'released' }));
    link.once(`${kind}_error`, () => resolve({ outcome: 'detached', condition: linkErrorCondition(link) }));
    link.once(`${kind}_close`, () => resolve({ outcome: 'detached', condition: linkErrorCondition(link) }));
  }), what, 10);
}

// Messages over the hub's limits (needs --sasl other than plain: it uses $cbs too).
async function oversizeMode(conn, f, deadline, cbsTx, cbsRx) {
  if (!cbsTx) throw new h.Failure(h.EXIT.OTHER, '--mode oversize needs $cbs (not --sasl plain)');
  const rhea = h.sdkRequire('rhea');
  const own = conn.open_sender({ target: `/devices/${f.DeviceId}/modules/${f.ModuleId}/messages/events` });
  if (!own.sendable()) await once(own, 'sendable', 'sender_error', 'own events link', deadline);
  const send = async (event, message) => {
    const settled = outcomeOrDetach(own, 'sender', event, deadline);
    own.send(message);
    h.emit(Object.assign({ event }, await settled));
  };
  const props = { 'iothub-outputname': 'probe' };
  const small = rhea.message.data_section(Buffer.from('{"probe":1}'));
  // A small body, a 120 KiB binary user id (360 KiB as the text the hub stores).
  await send('expanding', { message_id: 'probe-expanding', user_id: Buffer.alloc(120 * 1024, 0xff), body: small, application_properties: props });
  await send('after', { message_id: 'probe-after', body: small, application_properties: props });
  // 700 KiB in one transfer (several frames): over the events link's max-message-size.
  await send('big-event', { message_id: 'probe-big', body: rhea.message.data_section(Buffer.alloc(700 * 1024, 0x61)), application_properties: props });
  // A 64 KiB put-token on $cbs: over its max-message-size; answered, or the link detached.
  const answered = deadline.run(new Promise((resolve) => {
    cbsRx.once('message', (ctx) => resolve({ outcome: 'answered', status: ctx.message.application_properties['status-code'] }));
    cbsTx.once('sender_error', () => resolve({ outcome: 'detached', condition: linkErrorCondition(cbsTx) }));
    cbsTx.once('sender_close', () => resolve({ outcome: 'detached', condition: linkErrorCondition(cbsTx) }));
  }), 'big put-token', 10);
  cbsTx.send({
    message_id: 'big-cbs', to: '$cbs', reply_to: 'cbs', body: 'x'.repeat(64 * 1024),
    application_properties: { operation: 'put-token', type: 'servicebus.windows.net:sastoken', name: 'x' },
  });
  h.emit(Object.assign({ event: 'big-cbs' }, await answered));
  conn.close();
}

// The $cbs reply link closed and attached again; a renewal answered on each new one.
async function cbsReattachMode(args, conn, f, deadline, cbsTx, cbsRx) {
  if (!cbsTx) throw new h.Failure(h.EXIT.OTHER, '--mode cbs-reattach needs $cbs (not --sasl plain)');
  let rx = cbsRx;
  for (let n = 0; n < args.cycles; n++) {
    const closed = once(rx, 'receiver_close', 'receiver_error', 'closing the $cbs reply link', deadline);
    rx.close();
    await closed;
    rx = conn.open_receiver({ source: '$cbs' });
    await once(rx, 'receiver_open', 'receiver_error', 'the new $cbs reply link', deadline);
    const id = `renew-${n}`;
    const link = rx;
    const reply = deadline.run(new Promise((resolve) => {
      link.once('message', (ctx) => resolve({
        status: ctx.message.application_properties['status-code'], correlated: ctx.message.correlation_id === id,
      }));
      link.once('receiver_close', () => resolve({ status: null, correlated: false }));
    }), 'a put-token reply on the new reply link', 10);
    const { audience, token } = sasToken(f.HostName, f.DeviceId, f.ModuleId, f.SharedAccessKey, 3600);
    cbsTx.send({
      message_id: id, to: '$cbs', reply_to: 'cbs', body: token,
      application_properties: { operation: 'put-token', type: 'servicebus.windows.net:sastoken', name: audience },
    });
    h.emit(Object.assign({ event: 'reattached', n }, await reply));
  }
  conn.close();
}

// The module's inputs link with the sender settle mode asked for; reports what the hub
// answered and whether each delivery came pre-settled.
async function inputsMode(args, conn, f, deadline) {
  const modes = { unsettled: 0, settled: 1, mixed: 2 };
  const rx = conn.open_receiver({
    source: `/devices/${f.DeviceId}/modules/${f.ModuleId}/messages/events`,
    snd_settle_mode: modes[args.snd_settle], autoaccept: false, credit_window: 10,
  });
  await once(rx, 'receiver_open', 'receiver_error', 'inputs link', deadline);
  h.emit({ event: 'attached', snd_settle_mode: rx.remote.attach.snd_settle_mode });
  let got = 0;
  await deadline.run(new Promise((resolve) => {
    rx.on('message', (ctx) => {
      h.emit({ event: 'message', message_id: ctx.message.message_id, presettled: !!ctx.delivery.remote_settled });
      if (args.settle === 'accept') ctx.delivery.accept();
      got += 1;
      if (got >= args.count) resolve();
    });
  }), 'input messages');
  conn.close();
}

// Inputs links attached and closed again on one connection; the last one still receives.
async function inputsCycleMode(args, conn, f, deadline) {
  const source = `/devices/${f.DeviceId}/modules/${f.ModuleId}/messages/events`;
  const attach = async (what) => {
    const rx = conn.open_receiver({ source, autoaccept: false, credit_window: 10 });
    await once(rx, 'receiver_open', 'receiver_error', what, deadline);
    return rx;
  };
  const close = async (rx, what) => {
    const closed = once(rx, 'receiver_close', 'receiver_error', what, deadline);
    rx.close();
    await closed;
  };
  for (let n = 0; n < args.cycles; n++) {
    await close(await attach(`inputs link ${n}`), `closing inputs link ${n}`);
    h.emit({ event: 'cycled', n });
  }
  const first = await attach('first inputs link');
  const second = await attach('second inputs link');
  const message = deadline.run(new Promise((resolve) => {
    first.on('message', (ctx) => h.emit({ event: 'message', link: 'first', message_id: ctx.message.message_id }));
    second.once('message', (ctx) => {
      ctx.delivery.accept();
      resolve(ctx.message.message_id);
    });
  }), 'a message on the second inputs link', 60);
  await close(first, 'closing the first inputs link');
  h.emit({ event: 'ready' });
  h.emit({ event: 'message', link: 'second', message_id: await message });
  conn.close();
}

function fsRead(p) {
  return require('fs').readFileSync(p, 'ascii');
}

async function garbageMode(args) {
  const rhea = h.sdkRequire('rhea');
  const f = csFields();
  const deadline = new h.Deadline(args.timeout);
  const container = rhea.create_container();
  const conn = container.connect({
    host: f.GatewayHostName, port: 5671, transport: 'tls', ca: fsRead(process.env.EDGEHUB_CA),
    reconnect: false, sasl: { enabled: false },
  });
  conn.on('connection_error', () => {});
  conn.on('error', () => {});
  await once(conn, 'connection_open', 'connection_error', 'open', deadline);
  const closed = new Promise((resolve) => {
    conn.once('disconnected', () => resolve('disconnected'));
    conn.once('connection_close', () => resolve('closed by the hub'));
  });
  const t0 = Date.now();
  // A frame that claims 16 bytes, data offset 2, type 0 (AMQP), channel 0, and a body that is
  // no performative.
  conn.socket.write(Buffer.from([0, 0, 0, 16, 2, 0, 0, 0, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9, 0xf8]));
  const how = await deadline.run(closed, 'the hub closing the connection', 15);
  h.emit({ event: 'closed', how, ms: Date.now() - t0 });
}

// A plain AMQP connection (no SASL), opened; with the time it opened.
async function openPlain(deadline) {
  const rhea = h.sdkRequire('rhea');
  const f = csFields();
  const container = rhea.create_container();
  const conn = container.connect({
    host: f.GatewayHostName, port: 5671, transport: 'tls', ca: fsRead(process.env.EDGEHUB_CA),
    reconnect: false, sasl: { enabled: false },
  });
  conn.on('connection_error', () => {});
  conn.on('error', () => {});
  await once(conn, 'connection_open', 'connection_error', 'open', deadline);
  const closed = new Promise((resolve) => {
    conn.once('disconnected', () => resolve('disconnected'));
    conn.once('connection_close', () => resolve('closed by the hub'));
  });
  return { conn, f, closed, t0: Date.now() };
}

async function unauthenticatedMode(args) {
  const deadline = new h.Deadline(args.timeout);
  const { closed, t0 } = await openPlain(deadline);
  const how = await deadline.run(closed, 'the hub closing an unauthenticated connection');
  h.emit({ event: 'closed', how, ms: Date.now() - t0 });
}

async function cbsFloodMode(args) {
  const deadline = new h.Deadline(args.timeout);
  const { conn, f } = await openPlain(deadline);
  const { audience, token } = sasToken(f.HostName, f.DeviceId, f.ModuleId, f.SharedAccessKey, 3600);
  const tx = conn.open_sender({ target: '$cbs' });
  await once(tx, 'sendable', 'sender_error', '$cbs sender', deadline);
  let accepted = 0;
  let last = Date.now();
  tx.on('accepted', () => { accepted += 1; last = Date.now(); });
  const ids = [];
  for (let i = 0; i < args.count; i++) {
    const id = `put-${i}`;
    ids.push(id);
    tx.send({
      message_id: id, to: '$cbs', reply_to: 'cbs', body: token,
      application_properties: { operation: 'put-token', type: 'servicebus.windows.net:sastoken', name: audience },
    });
  }
  // Until every request is accepted, or none more for 2 s.
  await deadline.run(new Promise((resolve) => {
    const tick = setInterval(() => {
      if (accepted >= args.count || Date.now() - last > 2000) { clearInterval(tick); resolve(); }
    }, 50);
  }), 'put-token settlements');
  h.emit({ event: 'accepted-without-reply-link', n: accepted });
  const rx = conn.open_receiver({ source: '$cbs' });
  const got = [];
  await deadline.run(new Promise((resolve) => {
    rx.on('message', (ctx) => {
      got.push(ctx.message);
      if (got.length >= args.count) resolve();
    });
  }), 'put-token replies');
  h.emit({
    event: 'replies', n: got.length,
    in_order: got.every((m, i) => m.correlation_id === ids[i]),
    statuses: [...new Set(got.map((m) => m.application_properties['status-code']))],
  });
  conn.close();
}

async function manyLinksMode(args) {
  const deadline = new h.Deadline(args.timeout);
  const { conn } = await openPlain(deadline);
  const results = await deadline.run(Promise.all(Array.from({ length: args.count }, () => tryAttach(conn, 'sender', '$cbs'))), 'attaches');
  h.emit({
    event: 'links',
    attached: results.filter((r) => r.result === 'attached').length,
    refused: results.filter((r) => r.result === 'refused').length,
    conditions: [...new Set(results.map((r) => r.condition).filter((c) => c))],
  });
  conn.close();
}

const MODES = {
  garbage: garbageMode, unauthenticated: unauthenticatedMode, 'cbs-flood': cbsFloodMode, 'many-links': manyLinksMode,
};
h.main(SPEC, (args) => (MODES[args.mode] || attachMode)(args));
