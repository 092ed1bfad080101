#!/usr/bin/env python3
"""Reads and reports the module twin with the official Python SDK (asyncio client).

    EDGEHUB_CS=... EDGEHUB_CA=ca.pem twin.py [--listen] STEP...

STEP, run in order once connected: ``get`` (get_twin), ``patch:<json object>``
(patch_twin_reported_properties). With --listen, on_twin_desired_properties_patch_received is
set before connecting (so the SDK itself GETs the twin at every connect) and the script stays
connected until --timeout, printing every patch; without it, it leaves after the steps.

stdout: {"event":"connected",...}; {"event":"twin","twin":{...}} per get;
{"event":"patched","patch":{...}} per patch once the hub answered it; with --listen
{"event":"desired_patch","patch":{...}} per desired patch the SDK hands over, and
{"event":"ready"} after the steps; {"event":"done"} at the end. Exit codes: harness.py (a
twin call the hub refuses is exit 1 with the SDK's error).
"""

import asyncio
import json

import harness as h


async def run(args):
    deadline = h.Deadline(args.timeout)
    client = h.create_client(args)
    loop = asyncio.get_running_loop()

    if args.listen:
        async def on_patch(patch):
            h.emit({"event": "desired_patch", "patch": patch, "ms": h.elapsed_ms()})

        def set_handler():
            client.on_twin_desired_properties_patch_received = on_patch

        await deadline.run(loop.run_in_executor(None, set_handler), "set the desired-patch handler")

    await h.connect(client, args, deadline)
    for step in args.steps:
        if step == "get":
            twin = await deadline.run(client.get_twin(), "get_twin")
            h.emit({"event": "twin", "twin": twin, "ms": h.elapsed_ms()})
        elif step.startswith("patch:"):
            try:
                patch = json.loads(step[len("patch:"):])
            except ValueError as e:
                raise h.Failure(h.EXIT_USAGE, f"{step!r}: {e}")
            await deadline.run(client.patch_twin_reported_properties(patch), "patch reported")
            h.emit({"event": "patched", "patch": patch, "ms": h.elapsed_ms()})
        else:
            raise h.Failure(h.EXIT_USAGE, f"unknown step {step!r}: get or patch:<json>")
    if args.listen:
        h.emit({"event": "ready", "ms": h.elapsed_ms()})
        await asyncio.sleep(deadline.left())
    h.emit({"event": "done", "ms": h.elapsed_ms()})
    await h.close(client, args, h.Deadline(5))


def parser():
    p = h.new_parser(__doc__.splitlines()[0])
    p.add_argument("--listen", action="store_true", help="print desired patches until --timeout")
    p.add_argument("steps", nargs="*", help="get | patch:<json>")
    h.common_args(p, default_timeout=30.0)
    return p


if __name__ == "__main__":
    h.main(run, parser())
