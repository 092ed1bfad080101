#!/usr/bin/env node
'use strict';
// Receives input messages with the official Node SDK (on('inputMessage') + complete). Same
// options and JSON lines as tests/sdk/python/receive.py:
//   EDGEHUB_CS=... EDGEHUB_CA=ca.pem node receive.js --count 100 [--timeout 30] [--linger 2]
//   EDGEHUB_CS=... EDGEHUB_CA=ca.pem node receive.js --stay 10
//   [--reject-seq N]... [--abandon-seq N]...: reject() / abandon() those messages instead of
//   complete() (the "settled" field of their line says which)
// The Node SDK has no field for the connection ids: over MQTT they are in msg.properties
// ($.cdid / $.cmid, left in custom_properties too); over AMQP in the raw message's annotations
// iothub-connection-device-id / -module-id.
// "ready" is printed once the listener is added; the SDK subscribes right after, asynchronously
// (it has no callback for the SUBACK).
const crypto = require('crypto');
const h = require('./harness');

const SPEC = {
  count: { type: 'number', default: 0 },
  stay: { type: 'number', default: undefined },
  linger: { type: 'number', default: 0 },
  no_data: { type: 'flag', default: false },
  reject_seq: { type: 'list', default: undefined },
  abandon_seq: { type: 'list', default: undefined },
  listen_after_connect: { type: 'flag', default: false },
};

function describe(n, inputName, msg, args) {
  const data = Buffer.isBuffer(msg.data) ? msg.data : Buffer.from(msg.data === undefined || msg.data === null ? '' : msg.data);
  const props = {};
  const list = (msg.properties && msg.properties.propertyList) || [];
  for (const { key, value } of list) props[key] = value;
  const raw = msg.transportObj || {};
  const ann = raw.message_annotations || {};
  let seq = props.seq !== undefined ? Number(props.seq) : null;
  if (seq !== null && !Number.isInteger(seq)) seq = props.seq;
  const out = {
    n,
    input_name: inputName,
    message_id: msg.messageId === undefined ? null : msg.messageId,
    content_type: msg.contentType === undefined ? null : msg.contentType,
    content_encoding: msg.contentEncoding === undefined ? null : msg.contentEncoding,
    correlation_id: msg.correlationId === undefined ? null : msg.correlationId,
    user_id: msg.userId === undefined ? null : msg.userId,
    expiry_time_utc: msg.expiryTimeUtc === undefined ? null : msg.expiryTimeUtc,
    to: msg.to === undefined ? null : msg.to,
    custom_properties: props,
    connection_device_id: props['$.cdid'] || ann['iothub-connection-device-id'] || null,
    connection_module_id: props['$.cmid'] || ann['iothub-connection-module-id'] || null,
    // AMQP only: the hub's sequence number (its store offset); null over MQTT.
    sequence_number: ann['x-opt-sequence-number'] === undefined ? null : Number(ann['x-opt-sequence-number']),
    seq,
    data_len: data.length,
    data_sha256: crypto.createHash('sha256').update(data).digest('hex'),
    ms: h.elapsedMs(),
    // Wall-clock milliseconds (fractional): comparable across processes on one machine, to
    // merge several receivers' lines in arrival order.
    at: performance.timeOrigin + performance.now(),
  };
  if (!args.no_data) {
    const text = data.toString('utf8');
    if (Buffer.from(text, 'utf8').equals(data)) {
      out.data = text;
    } else {
      out.data = null;
      out.data_b64 = data.toString('base64');
    }
  }
  return out;
}

async function run(args) {
  const deadline = new h.Deadline(args.stay !== undefined ? args.stay : args.timeout);
  const client = await h.createClient(args);

  let received = 0;
  let reached;
  const reachedP = new Promise((r) => { reached = r; });
  const onMessage = (inputName, msg) => {
    received += 1;
    const line = describe(received, inputName, msg, args);
    // --reject-seq / --abandon-seq (AMQP: rejected / released dispositions) instead of complete.
    if ((args.reject_seq || []).includes(String(line.seq))) {
      line.settled = 'rejected';
      client.reject(msg, () => {});
    } else if ((args.abandon_seq || []).includes(String(line.seq))) {
      line.settled = 'abandoned';
      client.abandon(msg, () => {});
    } else {
      client.complete(msg, () => {});
    }
    h.emit(line);
    if (args.count && received === args.count) reached();
  };
  // Listen before connecting (as IoT Edge module templates do): on a resumed session the hub
  // delivers right after CONNACK, and a message with no listener would be lost to the module.
  // --listen-after-connect: only once connected. Listening first, the SDK enables input
  // messages on a connection of its own while open() makes another; over AMQP, if the first is
  // refused (a replicated module with its count of replicas) and the second gets in, the SDK
  // never enables them (it does not retry the refusal's UnauthorizedError).
  if (!args.listen_after_connect) client.on('inputMessage', onMessage);
  await h.connect(client, args, deadline);
  if (args.listen_after_connect) client.on('inputMessage', onMessage);
  h.emit({ event: 'ready', ms: h.elapsedMs() });

  const sleep = (s) => new Promise((r) => setTimeout(r, s * 1000));
  if (args.stay !== undefined || !args.count) {
    await sleep(deadline.left());
  } else {
    try {
      await deadline.run(reachedP, 'receive');
    } catch (e) {
      h.emit({ event: 'done', received, ms: h.elapsedMs() });
      throw new h.Failure(h.EXIT.TIMEOUT, `received ${received} of ${args.count} messages before the deadline`);
    }
    if (args.linger) await sleep(args.linger);
  }
  h.emit({ event: 'done', received, ms: h.elapsedMs() });
  await h.close(client, args);
}

h.main(SPEC, run);
