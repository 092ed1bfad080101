#!/usr/bin/env python3
"""Sends COUNT messages to a module output with the official Python SDK, one at a time.

    EDGEHUB_CS=... EDGEHUB_CA=ca.pem send.py --output out1 --count 100 [--run ID]

Each message: message_id "<mid-prefix><seq>", content_type/content_encoding as given, custom
properties run=<ID>, seq=<n>, with --keys K also key=<ID>-<seq mod K>, and any --prop; body the JSON {"seq":n,"run":ID} (padded to
--payload-size with a "pad" field), or --payload TEXT ({seq} and {run} replaced), or with
--binary --payload-size bytes that are not UTF-8.

stdout: {"event":"connected",...}, then one {"seq":n,"mid":...,"ms":...} line per send the hub
acknowledged (PUBACK), in order, then {"event":"done","sent":COUNT}. A send that fails because
the connection is down or drops is sent again (harness.with_retry: {"event":"retry",...}) until
the deadline, unless --no-retry. Exit codes: harness.py.
"""

import asyncio
import json

import harness as h


def body_for(args, seq):
    if args.binary:
        size = args.payload_size or 64
        # 0xff never appears in UTF-8; the sequence number is in the first 8 bytes.
        head = seq.to_bytes(8, "big")
        return head + bytes([0xFF]) * max(0, size - len(head))
    if args.payload is not None:
        return args.payload.replace("{seq}", str(seq)).replace("{run}", args.run).encode()
    doc = {"seq": seq, "run": args.run}
    text = json.dumps(doc, separators=(",", ":"))
    if args.payload_size and args.payload_size > len(text):
        pad = args.payload_size - len(text) - len(',"pad":""')
        doc["pad"] = "x" * max(0, pad)
        text = json.dumps(doc, separators=(",", ":"))
    return text.encode()


async def run(args):
    from azure.iot.device import Message

    props = h.parse_props(args.prop)
    deadline = h.Deadline(args.timeout)
    client = h.create_client(args)
    await h.connect(client, args, deadline)
    mid_prefix = args.mid_prefix if args.mid_prefix is not None else f"{args.run}-"
    for seq in range(args.start_seq, args.start_seq + args.count):
        msg = Message(
            body_for(args, seq),
            message_id=f"{mid_prefix}{seq}",
            content_encoding=args.content_encoding or None,
            content_type=args.content_type or None,
        )
        msg.custom_properties["run"] = args.run
        msg.custom_properties["seq"] = str(seq)
        if args.keys:
            msg.custom_properties["key"] = f"{args.run}-{seq % args.keys}"
        msg.custom_properties.update(props)
        # A module resends a message whose send failed because the hub was away (restarting):
        # the same message (same message_id), until it is acknowledged or the deadline passes.
        await h.with_retry(
            lambda: client.send_message_to_output(msg, args.output), args, deadline, f"send seq {seq}"
        )
        h.emit({"seq": seq, "mid": msg.message_id, "ms": h.elapsed_ms()})
        if args.interval_ms:
            await asyncio.sleep(args.interval_ms / 1000)
    h.emit({"event": "done", "sent": args.count, "ms": h.elapsed_ms()})
    await h.close(client, args, deadline)


def parser():
    p = h.new_parser(__doc__.splitlines()[0])
    p.add_argument("--output", default="out1", help="output name ($.on)")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--start-seq", type=int, default=0)
    p.add_argument("--run", default="run", help="run id: custom property 'run', mid prefix")
    p.add_argument("--mid-prefix", default=None, help="message_id prefix (default '<run>-')")
    p.add_argument("--content-type", default="application/json")
    p.add_argument("--content-encoding", default="utf-8")
    p.add_argument("--prop", action="append", help="extra custom property key=value")
    p.add_argument("--payload", default=None, help="body text; {seq} and {run} are replaced")
    p.add_argument("--payload-size", type=int, default=0, help="pad the body to this many bytes")
    p.add_argument("--binary", action="store_true", help="a non-UTF-8 body of --payload-size")
    p.add_argument("--keys", type=int, default=0, help="property key=<run>-<seq mod KEYS>")
    p.add_argument("--interval-ms", type=int, default=0, help="pause between sends")
    h.common_args(p)
    return p


if __name__ == "__main__":
    h.main(run, parser())
