#!/usr/bin/env python3
"""Connects with the official Python SDK and reports whether the hub let it in.

    EDGEHUB_CS=... EDGEHUB_CA=ca.pem connect_only.py [--hold 5]
    EDGEHUB_SAS='SharedAccessSignature sr=...' EDGEHUB_CA=ca.pem connect_only.py \
        --gateway 127.0.0.1 [--delay 3]

For security tests: a wrong key (CONNACK 5 -> exit 4), a token that expires between the
client's creation and its connection (EDGEHUB_SAS with a short se and --delay: the SDK itself
refuses an already expired token at creation, exit 2), a CA that does not match (exit 3).

stdout: {"event":"connected",...} on success; with --hold T it then stays connected T seconds
and prints {"event":"held","still_connected":bool}. Exit codes: harness.py.
"""

import asyncio

import harness as h


async def run(args):
    deadline = h.Deadline(args.timeout)
    client = h.create_client(args, allow_sas=True)
    if args.delay:
        await asyncio.sleep(args.delay)
    await h.connect(client, args, deadline)
    if args.hold:
        await asyncio.sleep(args.hold)
        h.emit({"event": "held", "still_connected": bool(client.connected), "ms": h.elapsed_ms()})
    await h.close(client, args, h.Deadline(5))


def parser():
    p = h.new_parser(__doc__.splitlines()[0])
    p.add_argument("--gateway", default="127.0.0.1", help="GatewayHostName for EDGEHUB_SAS")
    p.add_argument("--delay", type=float, default=0.0, help="wait between creation and connect")
    p.add_argument("--hold", type=float, default=0.0, help="stay connected this long")
    h.common_args(p, default_timeout=20.0)
    return p


if __name__ == "__main__":
    h.main(run, parser())
