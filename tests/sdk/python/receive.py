#!/usr/bin/env python3
"""Receives input messages with the official Python SDK (on_message_received, asyncio client).

    EDGEHUB_CS=... EDGEHUB_CA=ca.pem receive.py --count 100 [--timeout 30] [--linger 2]
    EDGEHUB_CS=... EDGEHUB_CA=ca.pem receive.py --stay 10

--count N: exit 0 once N messages arrived (after --linger more seconds, to catch extras or
duplicates), exit 5 if the --timeout deadline passes first. --stay T: stay connected T seconds
whatever arrives, then exit 0 (backlog tests). Neither: run until --timeout, exit 0.

stdout: {"event":"connected",...}, {"event":"ready",...} once the handler is set (the SDK has
its SUBACK by then), one line per message in arrival order:
  {"n":k,"input_name":..,"message_id":..,"content_type":..,"content_encoding":..,
   "correlation_id":..,"user_id":..,"expiry_time_utc":..,"custom_properties":{..},
   "connection_device_id":..,"connection_module_id":..,"seq":<int or null>,
   "data":<text or null>,"data_b64":<when not UTF-8>,"data_len":..,"data_sha256":..,"ms":..}
and {"event":"done","received":k}. The SDK has no field for the connection ids: they come
from custom_properties["$.cdid"/"$.cmid"] (left there too). --no-data drops data/data_b64.

--wire: also {"event":"wire","topic":..,"mono_ns":..} for every PUBLISH paho reads, printed on
paho's network thread before it sends the PUBACK (paho 1.6 calls on_message, then acknowledges).
The SDK hands a message to the handler later, on another thread, so a replica killed between the
two has acknowledged messages its handler never saw; the wire lines are what the hub delivered.
"mono_ns" (CLOCK_MONOTONIC, one clock for every process on the machine) orders lines of
several receivers against each other.
"""

import asyncio
import base64
import hashlib
import time

import harness as h


def describe(n, msg, args):
    data = msg.data
    if isinstance(data, str):
        data = data.encode()
    data = data or b""
    props = dict(msg.custom_properties or {})
    seq = props.get("seq")
    try:
        seq = int(seq) if seq is not None else None
    except ValueError:
        pass
    out = {
        "n": n,
        "input_name": msg.input_name,
        "message_id": msg.message_id,
        "content_type": msg.content_type,
        "content_encoding": msg.content_encoding,
        "correlation_id": msg.correlation_id,
        "user_id": msg.user_id,
        "expiry_time_utc": msg.expiry_time_utc,
        "custom_properties": props,
        "connection_device_id": props.get("$.cdid"),
        "connection_module_id": props.get("$.cmid"),
        "seq": seq,
        "data_len": len(data),
        "data_sha256": hashlib.sha256(data).hexdigest(),
        "ms": h.elapsed_ms(),
        "mono_ns": time.monotonic_ns(),
    }
    if not args.no_data:
        try:
            out["data"] = data.decode("utf-8")
        except UnicodeDecodeError:
            out["data"] = None
            out["data_b64"] = base64.b64encode(data).decode()
    return out


# Seconds without a message after an SDK thread died before the receiver gives up on it.
DRAIN_QUIET = 2.0


def record_wire():
    """Test instrumentation, not module behaviour: one line per PUBLISH as paho reads it."""
    import paho.mqtt.client as paho

    handle = paho.Client._handle_on_message

    def recorded(self, message):
        h.emit({"event": "wire", "topic": message.topic, "mono_ns": time.monotonic_ns()})
        return handle(self, message)

    paho.Client._handle_on_message = recorded


async def run(args):
    h.drain_after_sdk_thread_death()
    if args.wire:
        record_wire()
    deadline = h.Deadline(args.stay if args.stay is not None else args.timeout)
    client = h.create_client(args)

    received = 0
    reached = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def on_message(msg):
        # Runs on the SDK's handler loop (one thread): arrival order is kept.
        nonlocal received
        received += 1
        h.emit(describe(received, msg, args))
        if args.count and received == args.count:
            loop.call_soon_threadsafe(reached.set)

    def set_handler():
        # A blocking setter: returns once the SDK has the SUBACK for .../inputs/#.
        client.on_message_received = on_message

    # Set before connecting (as IoT Edge module templates do): on a resumed session the hub
    # delivers right after CONNACK, and without a handler the SDK PUBACKs and drops them.
    await deadline.run(loop.run_in_executor(None, set_handler), "subscribe (set on_message_received)")
    await h.connect(client, args, deadline)
    h.emit({"event": "ready", "ms": h.elapsed_ms()})

    async def body():
        if args.stay is not None or not args.count:
            await asyncio.sleep(deadline.left())
        else:
            try:
                await asyncio.wait_for(reached.wait(), timeout=deadline.left())
            except asyncio.TimeoutError:
                h.emit({"event": "done", "received": received, "ms": h.elapsed_ms()})
                raise h.Failure(h.EXIT_TIMEOUT,
                                f"received {received} of {args.count} messages before the deadline")
            if args.linger:
                await asyncio.sleep(args.linger)

    async def sdk_thread_death():
        # paho's network thread can die (EXIT_SDK_THREAD in harness.py) after it acknowledged
        # messages the SDK's handler thread has not handed on yet: take those (until none has
        # come for DRAIN_QUIET seconds), then exit so a test can start a fresh receiver.
        while not h.SDK_THREAD_DIED.is_set():  # a flag set by another thread: polled
            await asyncio.sleep(0.2)
        seen = -1
        while seen != received:
            seen = received
            await asyncio.sleep(DRAIN_QUIET)
        h.emit({"event": "done", "received": received, "ms": h.elapsed_ms()})
        raise h.Failure(h.EXIT_SDK_THREAD, h.SDK_THREAD_DEATH)

    tasks = [asyncio.ensure_future(body()), asyncio.ensure_future(sdk_thread_death())]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        t.result()
    h.emit({"event": "done", "received": received, "ms": h.elapsed_ms()})
    await h.close(client, args, h.Deadline(5))


def parser():
    p = h.new_parser(__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=0, help="exit 0 after this many messages")
    p.add_argument("--stay", type=float, default=None, help="stay online this long, then exit 0")
    p.add_argument("--linger", type=float, default=0.0, help="after --count, listen this long more")
    p.add_argument("--no-data", action="store_true", help="print data_len/sha256 only")
    p.add_argument("--wire", action="store_true", help="a line per PUBLISH paho reads (see above)")
    h.common_args(p)
    return p


if __name__ == "__main__":
    h.main(run, parser())
