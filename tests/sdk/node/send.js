#!/usr/bin/env node
'use strict';
// Sends COUNT messages to a module output with the official Node SDK (sendOutputEvent), one at
// a time. Same options, payloads and JSON lines as tests/sdk/python/send.py:
//   EDGEHUB_CS=... EDGEHUB_CA=ca.pem node send.js --output out1 --count 100 [--run ID]
//   [--transport mqtt|amqp] [--no-retry] [--timeout S] ...
// stdout: {"event":"connected",...}, {"seq":n,"mid":...,"ms":...} per acknowledged send,
// {"event":"done","sent":COUNT}. A send that fails because the connection is down or drops is
// sent again ({"event":"retry",...}) until the deadline, unless --no-retry. Exit codes: harness.js.
// --keys K (Node only): message seq carries the key "<run>-k<seq mod K>" as the JSON body's
// "key" member (for a replicated module's partitionKey "$body.key"; cycling over K keys).
const h = require('./harness');

const SPEC = {
  output: { type: 'string', default: 'out1' },
  count: { type: 'number', default: 1 },
  start_seq: { type: 'number', default: 0 },
  run: { type: 'string', default: 'run' },
  mid_prefix: { type: 'string', default: undefined },
  content_type: { type: 'string', default: 'application/json' },
  content_encoding: { type: 'string', default: 'utf-8' },
  prop: { type: 'list', default: undefined },
  payload: { type: 'string', default: undefined },
  payload_size: { type: 'number', default: 0 },
  binary: { type: 'flag', default: false },
  interval_ms: { type: 'number', default: 0 },
  keys: { type: 'number', default: 0 },
};

function bodyFor(args, seq) {
  if (args.binary) {
    const size = args.payload_size || 64;
    const b = Buffer.alloc(Math.max(8, size), 0xff);
    b.writeBigUInt64BE(BigInt(seq), 0);
    return b;
  }
  if (args.payload !== undefined) {
    return Buffer.from(args.payload.split('{seq}').join(String(seq)).split('{run}').join(args.run));
  }
  const doc = { seq, run: args.run };
  if (args.keys > 0) doc.key = `${args.run}-k${seq % args.keys}`;
  let text = JSON.stringify(doc);
  if (args.payload_size > text.length) {
    doc.pad = 'x'.repeat(Math.max(0, args.payload_size - text.length - ',"pad":""'.length));
    text = JSON.stringify(doc);
  }
  return Buffer.from(text);
}

async function run(args) {
  const { Message } = h.sdkRequire('azure-iot-device');
  const props = h.parseProps(args.prop);
  const deadline = new h.Deadline(args.timeout);
  const client = await h.createClient(args);
  await h.connect(client, args, deadline);
  const midPrefix = args.mid_prefix !== undefined ? args.mid_prefix : `${args.run}-`;
  for (let seq = args.start_seq; seq < args.start_seq + args.count; seq++) {
    const msg = new Message(bodyFor(args, seq));
    msg.messageId = `${midPrefix}${seq}`;
    if (args.content_type) msg.contentType = args.content_type;
    if (args.content_encoding) msg.contentEncoding = args.content_encoding;
    msg.properties.add('seq', String(seq));
    msg.properties.add('run', args.run);
    for (const [k, v] of props) msg.properties.add(k, v);
    // A send that failed because the hub was away (restarting) is sent again, as a module does:
    // the same message, until it is acknowledged or the deadline passes.
    await h.withRetry(() => client.sendOutputEvent(args.output, msg), args, deadline, `send seq ${seq}`);
    h.emit({ seq, mid: msg.messageId, ms: h.elapsedMs() });
    if (args.interval_ms) await new Promise((r) => setTimeout(r, args.interval_ms));
  }
  h.emit({ event: 'done', sent: args.count, ms: h.elapsedMs() });
  await h.close(client, args);
}

h.main(SPEC, run);
