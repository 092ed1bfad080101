#!/usr/bin/env node
'use strict';
// Connects with the official Node SDK and reports whether the hub let it in (security tests).
//   EDGEHUB_CS=... EDGEHUB_CA=ca.pem node connect_only.js [--no-retry] [--hold 5]
// stdout: {"event":"connected",...}; with --hold T it stays connected T seconds, then prints
// {"event":"held"}. A refused CONNACK (5) is exit 4; nothing listening / bad CA is exit 3 with
// --no-retry (without it the SDK retries open() for minutes: exit 5 at --timeout).
const h = require('./harness');

const SPEC = {
  hold: { type: 'number', default: 0 },
};

async function run(args) {
  const deadline = new h.Deadline(args.timeout);
  const client = await h.createClient(args);
  await h.connect(client, args, deadline);
  if (args.hold) {
    await new Promise((r) => setTimeout(r, args.hold * 1000));
    h.emit({ event: 'held', ms: h.elapsedMs() });
  }
  await h.close(client, args);
}

h.main(SPEC, run);
