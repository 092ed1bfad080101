#!/usr/bin/env python3
"""Direct methods with the official Python SDK: serve them, or invoke one on another module.

    method.py serve [--status 200] [--no-answer] [--count N] --edge-env | (EDGEHUB_CS, EDGEHUB_CA)
    method.py invoke --device D --module M --method NAME [--payload JSON]
              [--response-timeout S] [--connect-timeout S] --edge-env

serve: on_method_request_received; prints {"event":"ready"} once the handler is set (the SDK
has its SUBACK by then), one line per request {"rid","name","payload","ms"}, and answers each
with send_method_response(status, {"echo": payload, "by": <own module id>, "method": name})
unless --no-answer. With --count N it exits 0 after N requests, else at --timeout.

invoke: IoTHubModuleClient.invoke_method(...) (only from the edge environment: --edge-env),
which the SDK sends over HTTPS to port 443 of the gateway host. Prints one data line
{"ok":true,"response":<the JSON the hub answered>} or
{"ok":false,"status":<the HTTP status in the SDK's error>,"error":"..."}; exit 0 either way
(the test judges the outcome); an error without an HTTP status exits as harness.py says.
"""

import asyncio
import json
import re

import harness as h


async def serve(args):
    from azure.iot.device import MethodResponse

    deadline = h.Deadline(args.timeout)
    client = h.create_client(args)
    await h.connect(client, args, deadline)
    _, own = h.ids_from_env()
    done = asyncio.Event()
    seen = 0

    async def on_request(request):
        nonlocal seen
        seen += 1
        h.emit({"rid": request.request_id, "name": request.name, "payload": request.payload,
                "ms": h.elapsed_ms()})
        if not args.no_answer:
            body = {"echo": request.payload, "by": own, "method": request.name}
            await client.send_method_response(
                MethodResponse.create_from_method_request(request, args.status, body))
            h.emit({"event": "answered", "rid": request.request_id, "ms": h.elapsed_ms()})
        if args.count and seen >= args.count:
            done.set()

    client.on_method_request_received = on_request
    h.emit({"event": "ready", "ms": h.elapsed_ms()})
    try:
        await asyncio.wait_for(done.wait(), timeout=deadline.left())
    except asyncio.TimeoutError:
        if args.count:
            raise h.Failure(h.EXIT_TIMEOUT, f"{seen} of {args.count} requests within the deadline")
    h.emit({"event": "done", "requests": seen})
    await h.close(client, args, h.Deadline(5))


async def invoke(args):
    from azure.iot.device import exceptions as ex

    if not args.edge_env:
        raise h.Failure(h.EXIT_USAGE, "invoke_method works only from the edge environment: --edge-env")
    client = h.create_client(args)
    params = {"methodName": args.method, "payload": json.loads(args.payload)}
    if args.response_timeout is not None:
        params["responseTimeoutInSeconds"] = args.response_timeout
    if args.connect_timeout_s is not None:
        params["connectTimeoutInSeconds"] = args.connect_timeout_s
    deadline = h.Deadline(args.timeout)
    try:
        response = await deadline.run(
            client.invoke_method(params, args.device, args.module), "invoke_method")
        h.emit({"ok": True, "response": response, "ms": h.elapsed_ms()})
    except (ex.ServiceError, ex.ClientError) as e:
        # The SDK raises ClientError("Unexpected failure") from ServiceError("HTTP operation
        # returned: <status> <reason>").
        chain, cur = [], e
        while cur is not None and len(chain) < 4:
            chain.append(f"{type(cur).__name__}: {cur}")
            cur = cur.__cause__
        m = re.search(r"HTTP operation returned: (\d{3})", " <- ".join(chain))
        if m is None:
            raise
        h.emit({"ok": False, "status": int(m.group(1)), "error": " <- ".join(chain),
                "ms": h.elapsed_ms()})
    await h.close(client, args, h.Deadline(5))


async def run(args):
    if args.mode == "serve":
        await serve(args)
    else:
        await invoke(args)


def parser():
    p = h.new_parser(__doc__.splitlines()[0])
    p.add_argument("mode", choices=["serve", "invoke"])
    p.add_argument("--status", type=int, default=200, help="serve: the status to answer")
    p.add_argument("--no-answer", action="store_true", help="serve: never answer")
    p.add_argument("--count", type=int, default=0, help="serve: exit after this many requests")
    p.add_argument("--device", help="invoke: the target device")
    p.add_argument("--module", help="invoke: the target module")
    p.add_argument("--method", default="ping", help="invoke: the method name")
    p.add_argument("--payload", default="null", help="invoke: the payload (JSON text)")
    p.add_argument("--response-timeout", type=int, default=None,
                   help="invoke: responseTimeoutInSeconds")
    p.add_argument("--connect-timeout-s", type=int, default=None,
                   help="invoke: connectTimeoutInSeconds")
    h.common_args(p, default_timeout=60.0)
    return p


if __name__ == "__main__":
    h.main(run, parser())
