"""Shared plumbing of the Python SDK scripts (send.py, receive.py, connect_only.py).

The contract every script keeps (README.md beside this folder, and hub/tests/support/sdk.rs):

* input: env EDGEHUB_CS (module connection string with GatewayHostName) or, for
  connect_only.py, EDGEHUB_SAS (a SAS token) + --gateway; env EDGEHUB_CA (path of the PEM the
  hub's server certificate chains to); options on the command line.
* stdout: JSON lines only, flushed one by one. Lines with an "event" key are status lines
  (connected, ready, done); the others are data (one per acknowledged send / received message).
* stderr: SDK logs (only with --verbose) and, on failure, one last line
  ``edgehub-sdk <script>: error=<kind> exit=<code>: <detail>``.
* exit code: EXIT_* below.
"""

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
import traceback

EXIT_OK = 0
EXIT_OTHER = 1  # an exception the harness did not expect: a bug here or in the SDK
EXIT_USAGE = 2  # bad arguments, missing env, unreadable CA file
EXIT_CONNECT = 3  # could not connect: refused, unreachable, connection closed
EXIT_AUTH = 4  # the hub refused the credentials (CONNACK 5 -> CredentialError)
EXIT_TIMEOUT = 5  # the deadline passed first (connect, an ack, or fewer messages than asked)
EXIT_TLS = 6  # TLS handshake failed: server certificate not trusted by EDGEHUB_CA, wrong name
# An SDK thread died of an uncaught exception. paho 1.6.1's network thread does so on
# ssl.SSLEOFError when the server vanishes while it writes, and the SDK then never connects
# again: the script would hang until its deadline. It exits at once instead, so a test can tell
# this SDK bug from a hub fault and carry on with a fresh client.
EXIT_SDK_THREAD = 7

_KIND = {
    EXIT_OTHER: "other",
    EXIT_USAGE: "usage",
    EXIT_CONNECT: "connect",
    EXIT_AUTH: "auth",
    EXIT_TIMEOUT: "timeout",
    EXIT_TLS: "tls",
    EXIT_SDK_THREAD: "sdk-thread",
}

_out_lock = threading.Lock()
_t0 = time.monotonic()
SCRIPT = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "sdk"


class Failure(Exception):
    """Ends the script with a given exit code and a one-line reason."""

    def __init__(self, code, detail):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def elapsed_ms():
    return int((time.monotonic() - _t0) * 1000)


def emit(obj):
    """Prints one JSON line on stdout and flushes it (callable from any thread)."""
    line = json.dumps(obj, separators=(",", ":"), sort_keys=False)
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def finish(code, detail=None):
    """Flushes and leaves at once: the SDK's own threads must not keep the process alive."""
    if code != EXIT_OK:
        kind = _KIND.get(code, "other")
        with _out_lock:
            sys.stdout.flush()
            sys.stderr.write(f"edgehub-sdk {SCRIPT}: error={kind} exit={code}: {detail}\n")
            sys.stderr.flush()
    else:
        with _out_lock:
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code)


def common_args(parser, default_timeout=30.0):
    parser.add_argument(
        "--timeout",
        type=float,
        default=default_timeout,
        help="overall deadline in seconds, connection included (exit 5 when it passes)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        help="deadline for the connection alone (default: the overall one)",
    )
    parser.add_argument(
        "--no-retry",
        action="store_true",
        help="connection_retry=False (default: the SDK's own retrying, as a real module has)",
    )
    parser.add_argument("--keep-alive", type=int, default=None, help="MQTT keep-alive seconds")
    parser.add_argument(
        "--sastoken-ttl", type=int, default=None, help="TTL of the SDK-made SAS token (seconds)"
    )
    parser.add_argument(
        "--no-shutdown",
        action="store_true",
        help="exit without the SDK's graceful shutdown/DISCONNECT (a module that dies)",
    )
    parser.add_argument("--verbose", action="store_true", help="SDK debug logs on stderr")
    parser.add_argument(
        "--edge-env",
        action="store_true",
        help="create_from_edge_environment(): the client from the module environment IoT Edge "
        "(or the Kubernetes controller) sets; EDGEHUB_CS and EDGEHUB_CA are not read",
    )


def read_ca():
    path = os.environ.get("EDGEHUB_CA")
    if not path:
        raise Failure(EXIT_USAGE, "EDGEHUB_CA (path of the CA PEM file) is not set")
    try:
        with open(path, "r", encoding="ascii") as f:
            pem = f.read()
    except OSError as e:
        raise Failure(EXIT_USAGE, f"cannot read EDGEHUB_CA={path}: {e}")
    if "BEGIN CERTIFICATE" not in pem:
        raise Failure(EXIT_USAGE, f"EDGEHUB_CA={path} holds no PEM certificate")
    return pem


def client_kwargs(args):
    kw = {"server_verification_cert": read_ca()}
    if args.no_retry:
        kw["connection_retry"] = False
    if args.keep_alive is not None:
        kw["keep_alive"] = args.keep_alive
    return kw


def create_client(args, allow_sas=False):
    """The asyncio IoTHubModuleClient from EDGEHUB_CS (or EDGEHUB_SAS when allowed).

    The asyncio client runs a coroutine handler on one loop, so received messages reach the
    script in arrival order (the sync client's 4-thread pool may reorder them).
    """
    from azure.iot.device.aio import IoTHubModuleClient

    if args.edge_env:
        return create_from_edge_environment(IoTHubModuleClient, args)
    kw = client_kwargs(args)
    cs = os.environ.get("EDGEHUB_CS")
    sas = os.environ.get("EDGEHUB_SAS") if allow_sas else None
    try:
        if sas:
            kw["gateway_hostname"] = args.gateway
            return IoTHubModuleClient.create_from_sastoken(sas, **kw)
        if not cs:
            want = "EDGEHUB_CS or EDGEHUB_SAS" if allow_sas else "EDGEHUB_CS"
            raise Failure(EXIT_USAGE, f"{want} is not set")
        if "GatewayHostName=" not in cs:
            raise Failure(EXIT_USAGE, "EDGEHUB_CS has no GatewayHostName=: it would dial HostName")
        if args.sastoken_ttl is not None:
            kw["sastoken_ttl"] = args.sastoken_ttl
        return IoTHubModuleClient.create_from_connection_string(cs, **kw)
    except ValueError as e:  # the SDK's own checks: malformed string, expired token
        raise Failure(EXIT_USAGE, f"SDK refused the credentials before connecting: {e}")


def create_from_edge_environment(client_class, args):
    """The client exactly as a module in IoT Edge makes it: from the environment only (the SDK
    reads IOTEDGE_* or EdgeHubConnectionString + EdgeModuleCACertificateFile itself)."""
    kw = {}
    if args.no_retry:
        kw["connection_retry"] = False
    if args.keep_alive is not None:
        kw["keep_alive"] = args.keep_alive
    try:
        return client_class.create_from_edge_environment(**kw)
    except (OSError, ValueError) as e:
        chain = f"{type(e).__name__}: {e}"
        if e.__cause__ is not None:
            chain += f" <- {type(e.__cause__).__name__}: {e.__cause__}"
        raise Failure(EXIT_USAGE, f"create_from_edge_environment() failed: {chain}")


def ids_from_env():
    """Device and module id as the connection string (or the SAS sr) names them."""
    cs = os.environ.get("EDGEHUB_CS") or os.environ.get("EdgeHubConnectionString") or ""
    parts = dict(p.split("=", 1) for p in cs.split(";") if "=" in p)
    return parts.get("DeviceId"), parts.get("ModuleId")


def classify(exc):
    """Maps an exception to (exit code, detail)."""
    if isinstance(exc, Failure):
        return exc.code, exc.detail
    from azure.iot.device import exceptions as ex

    chain = []
    e = exc
    while e is not None and len(chain) < 4:
        chain.append(f"{type(e).__name__}: {e}".strip().rstrip(":"))
        e = e.__cause__ or e.__context__
    detail = " <- ".join(chain)
    if isinstance(exc, Failure):
        return exc.code, exc.detail
    names = []
    e = exc
    while e is not None and len(names) < 6:
        names.append(type(e).__name__)
        e = e.__cause__ or e.__context__
    # A failed handshake surfaces as a bare ClientError("... due to TLS exchanges") whose cause
    # is the SDK's TlsExchangeAuthError over ssl.SSLCertVerificationError.
    if any(n in ("TlsExchangeAuthError", "SSLCertVerificationError", "SSLError") for n in names):
        return EXIT_TLS, detail
    if isinstance(exc, ex.CredentialError):
        return EXIT_AUTH, detail
    if isinstance(exc, (ex.ConnectionFailedError, ex.ConnectionDroppedError, ex.NoConnectionError)):
        return EXIT_CONNECT, detail
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return EXIT_TIMEOUT, detail or "deadline passed"
    return EXIT_OTHER, detail + "\n" + "".join(traceback.format_exception(exc))


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self):
        return max(0.0, self.end - time.monotonic())

    async def run(self, aw, what, cap=None):
        left = self.left() if cap is None else min(self.left(), cap)
        try:
            return await asyncio.wait_for(aw, timeout=left)
        except asyncio.TimeoutError:
            raise Failure(EXIT_TIMEOUT, f"{what}: no answer within the deadline ({left:.1f}s left)")


def is_transient(exc):
    """Whether an operation failed only because the connection was down or went down (the hub
    restarting): what a module retries. Credentials, TLS and usage errors are not."""
    from azure.iot.device import exceptions as ex

    if isinstance(exc, (ex.OperationTimeout, ex.OperationCancelled)):
        return True
    if isinstance(exc, (ex.NoConnectionError, ex.ConnectionDroppedError, ex.ConnectionFailedError)):
        return classify(exc)[0] == EXIT_CONNECT  # not a TLS failure
    return False


async def with_retry(op, args, deadline, what):
    """Runs ``op()`` (a coroutine factory) until it succeeds, retrying as a module does when the
    connection is down or drops (the SDK reconnects on the next operation): 0.1 s doubling to
    2 s between attempts, within ``deadline``. Each retry is reported as an
    ``{"event":"retry",...}`` line. With --no-retry, or for any other error, it fails at once.
    """
    pause = 0.1
    attempt = 1
    while True:
        try:
            return await deadline.run(op(), what)
        except Failure:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if args.no_retry or not is_transient(e) or deadline.left() <= pause:
                raise
            emit({"event": "retry", "what": what, "attempt": attempt,
                  "error": type(e).__name__, "ms": elapsed_ms()})
            await asyncio.sleep(pause)
            pause = min(2.0, pause * 2)
            attempt += 1


async def connect(client, args, deadline):
    cap = args.connect_timeout
    await deadline.run(client.connect(), "connect", cap)
    dev, mod = ids_from_env()
    emit({"event": "connected", "sdk": "python", "device_id": dev, "module_id": mod,
          "ms": elapsed_ms()})


async def close(client, args, deadline):
    if args.no_shutdown:
        return
    try:
        await asyncio.wait_for(client.shutdown(), timeout=max(1.0, min(5.0, deadline.left())))
    except Exception:  # noqa: BLE001 - shutting down; the work is done and reported
        pass


# Set when an SDK thread died (see EXIT_SDK_THREAD); SDK_THREAD_DEATH holds why.
SDK_THREAD_DIED = threading.Event()
SDK_THREAD_DEATH = ""
_drain_after_thread_death = False


def drain_after_sdk_thread_death():
    """For receivers: when an SDK thread dies, leave exiting to the script, which first takes
    what the SDK already acknowledged and holds in its inbox (see receive.py)."""
    global _drain_after_thread_death
    _drain_after_thread_death = True


def _sdk_thread_died(hook):
    global SDK_THREAD_DEATH
    SDK_THREAD_DEATH = (f"SDK thread {getattr(hook.thread, 'name', '?')} died: "
                        f"{hook.exc_type.__name__}: {hook.exc_value}")
    emit({"event": "sdk-thread-died", "thread": getattr(hook.thread, "name", None),
          "error": repr(hook.exc_value), "ms": elapsed_ms()})
    SDK_THREAD_DIED.set()
    if not _drain_after_thread_death:
        finish(EXIT_SDK_THREAD, SDK_THREAD_DEATH)


def main(coro_fn, parser):
    """Runs coro_fn(args) and exits with the contract's code."""
    args = parser.parse_args()
    threading.excepthook = _sdk_thread_died
    try:
        import azure.iot.device  # noqa: F401
    except ImportError as e:
        finish(EXIT_USAGE, f"azure-iot-device is not importable by {sys.executable} (use "
               f"${{EDGEHUB_SDK_DIR}}/venv/bin/python; run scripts/install-sdks.sh): {e}")
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    else:
        # The SDK logs retries and dropped connections at WARNING/ERROR through logging's
        # last-resort handler; keep stderr for the harness's one error line.
        logging.getLogger("azure.iot.device").setLevel(logging.CRITICAL)
        logging.getLogger("paho").setLevel(logging.CRITICAL)
    try:
        asyncio.run(coro_fn(args))
    except Failure as f:
        finish(f.code, f.detail)
    except BaseException as e:  # noqa: BLE001 - every failure must map to an exit code
        if isinstance(e, KeyboardInterrupt):
            finish(EXIT_OTHER, "interrupted")
        code, detail = classify(e)
        finish(code, detail)
    finish(EXIT_OK)


def parse_props(pairs):
    props = {}
    for p in pairs or []:
        if "=" not in p:
            raise Failure(EXIT_USAGE, f"--prop wants key=value, got {p!r}")
        k, v = p.split("=", 1)
        props[k] = v
    return props


def new_parser(description):
    return argparse.ArgumentParser(description=description)
