#!/usr/bin/env node
'use strict';
// Reads and reports the module twin with the official Node SDK (MQTT or AMQP: --transport).
//   EDGEHUB_CS=... EDGEHUB_CA=ca.pem node twin.js [--transport amqp] [--listen]
//     [--step get] [--step 'patch:{"a":1}'] ...
// Once connected it calls client.getTwin(), then runs the steps in order: `get` (twin.get(),
// the twin read again) and `patch:<json object>` (twin.properties.reported.update). With
// --listen it then sets twin.on('properties.desired') and turns desired-properties updates on
// (waiting for the hub's answer), and stays connected until --timeout, printing every patch.
// stdout: {"event":"connected",...}; {"event":"twin","twin":{"desired":..,"reported":..}} for
// the first getTwin and per get; {"event":"patched","patch":{...}} per patch once the hub
// answered it; with --listen {"event":"desired_patch","patch":{...}} per event (the first is
// the desired properties already read, as the SDK fires it at once), {"event":"ready"} once
// updates are on; {"event":"done"} at the end. Exit codes: harness.js (a twin call the hub
// refuses is exit 1 with the SDK's error).
const h = require('./harness');

const SPEC = {
  step: { type: 'list', default: [] },
  listen: { type: 'flag', default: false },
};

function snapshot(twin) {
  // JSON drops the SDK's `update` function from properties.reported.
  return JSON.parse(JSON.stringify({ desired: twin.properties.desired, reported: twin.properties.reported }));
}

function callback(fn) {
  return new Promise((resolve, reject) => fn((err, res) => (err ? reject(err) : resolve(res))));
}

async function run(args) {
  const deadline = new h.Deadline(args.timeout);
  const client = await h.createClient(args);
  await h.connect(client, args, deadline);
  const twin = await deadline.run(client.getTwin(), 'getTwin');
  h.emit({ event: 'twin', twin: snapshot(twin), ms: h.elapsedMs() });
  for (const step of args.step) {
    if (step === 'get') {
      await deadline.run(twin.get(), 'twin.get');
      h.emit({ event: 'twin', twin: snapshot(twin), ms: h.elapsedMs() });
    } else if (step.startsWith('patch:')) {
      let patch;
      try {
        patch = JSON.parse(step.slice('patch:'.length));
      } catch (e) {
        throw new h.Failure(h.EXIT.USAGE, `${step}: ${e.message}`);
      }
      await deadline.run(callback((cb) => twin.properties.reported.update(patch, cb)), 'reported.update');
      h.emit({ event: 'patched', patch, ms: h.elapsedMs() });
    } else {
      throw new h.Failure(h.EXIT.USAGE, `unknown step ${step}: get or patch:<json>`);
    }
  }
  if (args.listen) {
    twin.on('properties.desired', (patch) => h.emit({ event: 'desired_patch', patch, ms: h.elapsedMs() }));
    // The listener turns updates on by itself, without telling when; this call (idempotent
    // on the hub) says when the hub answered.
    await deadline.run(callback((cb) => twin.enableTwinDesiredPropertiesUpdates(cb)), 'enable desired updates');
    h.emit({ event: 'ready', ms: h.elapsedMs() });
    await new Promise((r) => setTimeout(r, deadline.left() * 1000));
  }
  h.emit({ event: 'done', ms: h.elapsedMs() });
  await h.close(client, args);
}

h.main(SPEC, run);
