#!/usr/bin/env bash
# Where a lone SDK message's time goes inside the hub (issue 18, part 3): kernel tracepoints, no
# PMU needed (this machine's perf has no hardware counters).
#
#   benches/sdk_trace.sh [--count N] [--sdk python|node-mqtt|node-amqp] [--commit-on-caller true|false]
#                        [--broker edgehub|mosquitto]
#
# Runs the release hub in a network namespace, sends N messages with the unmodified SDK sender
# (one at a time, as modules do) once to warm up and once under `perf record` of the hub's
# sched_switch/sched_wakeup and syscall tracepoints, then splits every message's time in the hub:
# PUBLISH read (recvfrom) → fdatasync start → fdatasync end → PUBACK written (writev), and the
# client's own time between a PUBACK and its next PUBLISH. Prints p50/p90/p99/mean of each.
# --broker mosquitto traces an in-memory mosquitto (TLS, sender only, MQTT SDKs) the same way
# (read → write): the same client's own time against a broker that answers at once, so what the
# client adds when its acknowledgement comes later can be told from what the hub adds.
# Needs root, perf, openssl, the SDKs (scripts/install-sdks.sh) and
# cargo build --profile bench -p hub (and mosquitto for --broker mosquitto).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=1000
SDK=python
CALLER=true
BROKER=edgehub
while [ $# -gt 0 ]; do
  case "$1" in
    --count) COUNT="$2"; shift 2 ;;
    --sdk) SDK="$2"; shift 2 ;;
    --commit-on-caller) CALLER="$2"; shift 2 ;;
    --broker) BROKER="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${EDGEHUB_BIN:-$TARGET/release/edgehub}
[ -x "$BIN" ] || { echo "no $BIN (cargo build --profile bench -p hub)" >&2; exit 2; }
command -v perf >/dev/null || { echo "no perf (apt-get install linux-perf)" >&2; exit 2; }
case "$BROKER" in
  edgehub) ;;
  mosquitto)
    MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
    [ -x "$MOSQUITTO" ] || { echo "no mosquitto (apt-get install mosquitto)" >&2; exit 2; }
    [ "$SDK" != node-amqp ] || { echo "mosquitto speaks no AMQP" >&2; exit 2; } ;;
  *) echo "unknown broker $BROKER (edgehub or mosquitto)" >&2; exit 2 ;;
esac
export EDGEHUB_SDK_DIR=${EDGEHUB_SDK_DIR:-/var/tmp/edgehub-sdk}
PY=$EDGEHUB_SDK_DIR/venv/bin/python3
mkdir -p "$TARGET/bench-tmp"
W=$(mktemp -d "$TARGET/bench-tmp/sdk-trace.XXXXXX")
NS=ehtrace-$$
HUB=
cleanup() {
  [ -n "$HUB" ] && { kill "$HUB" 2>/dev/null || true; wait "$HUB" 2>/dev/null || true; }
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
benches/loopback_cert.sh "$W"
ARGS=(--data-dir "$W/data" --gateway-hostname 127.0.0.1 --iothub-hostname edgehub.local
      --device-id edge-device --log warn)
CS=$("$BIN" connection-string sender "${ARGS[@]}")
if [ "$BROKER" = edgehub ]; then
  ip netns exec "$NS" "$BIN" run "${ARGS[@]}" --mqtt-addr 127.0.0.1:8883 --amqp-addr 127.0.0.1:5671 \
    --metrics-addr 127.0.0.1:9600 --tls-cert "$W/server.pem" --tls-key "$W/server.key" \
    --tls-ca "$W/ca.pem" --commit-on-caller "$CALLER" 2>"$W/hub.log" &
  PORT=5671
  # A PUBLISH is read with recvfrom, an acknowledgement written with writev.
  EVENTS=syscalls:sys_exit_recvfrom,syscalls:sys_enter_writev
else
  # In memory, as in benches/sdk_stop_and_wait.sh.
  printf 'listener 8883 127.0.0.1\ncertfile %s\nkeyfile %s\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nuser root\n' \
    "$W/server.pem" "$W/server.key" > "$W/mosquitto.conf"
  ip netns exec "$NS" "$MOSQUITTO" -c "$W/mosquitto.conf" 2>"$W/hub.log" &
  PORT=8883
  # OpenSSL's socket BIO reads and writes with read and write.
  EVENTS=syscalls:sys_exit_read,syscalls:sys_enter_write
fi
HUB=$!
for _ in $(seq 200); do
  ip netns exec "$NS" bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" 2>/dev/null && break
  sleep 0.05
done
send() {
  case "$SDK" in
    python) EDGEHUB_CS="$CS" EDGEHUB_CA="$W/ca.pem" ip netns exec "$NS" "$PY" \
              tests/sdk/python/send.py --run "$1" --count "$COUNT" --timeout 600 ;;
    node-mqtt|node-amqp) EDGEHUB_CS="$CS" EDGEHUB_CA="$W/ca.pem" ip netns exec "$NS" \
              node tests/sdk/node/send.js --transport "${SDK#node-}" --run "$1" --count "$COUNT" --timeout 600 ;;
    *) echo "unknown SDK $SDK" >&2; exit 2 ;;
  esac >/dev/null
}
send warm
perf record -q -o "$W/perf.data" -p "$HUB" -e "sched:sched_switch,sched:sched_wakeup,syscalls:sys_enter_fdatasync,syscalls:sys_exit_fdatasync,$EVENTS" 2>/dev/null &
PERF=$!
sleep 1
send traced
kill -INT "$PERF"; wait "$PERF" || true
perf script -i "$W/perf.data" 2>/dev/null > "$W/perf.txt"
if [ "$BROKER" = edgehub ]; then
  echo "edgehub $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $SDK, $COUNT messages, --commit-on-caller $CALLER, load average $(cut -d' ' -f1-3 /proc/loadavg)"
else
  echo "mosquitto $("$MOSQUITTO" -h 2>/dev/null | sed -n 's/.*version \([0-9.]*\).*/\1/p' | head -1) (memory), $SDK, $COUNT messages, load average $(cut -d' ' -f1-3 /proc/loadavg)"
fi
python3 - "$W/perf.txt" "$BROKER" <<'PYEOF'
import re, statistics, sys
line_re = re.compile(r'\s*(\S+)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)')
hub, pre, sync, post, client = [], [], [], [], []
threads = set()
read_at = sync_at = synced_at = last_ack = None
for line in open(sys.argv[1]):
    m = line_re.match(line)
    if not m:
        continue
    comm, tid, _, t, name, rest = m.groups()
    t = float(t)
    if name in ('syscalls:sys_exit_recvfrom', 'syscalls:sys_exit_read'):
        try:
            n = int(rest.split()[-1], 16)
        except ValueError:
            continue
        if 100 < n < 1000:  # a PUBLISH or a transfer (pings and acks are smaller)
            if last_ack is not None:
                client.append(t - last_ack)
            read_at, sync_at, synced_at, last_ack = t, None, None, None
    elif name == 'syscalls:sys_enter_fdatasync' and read_at:
        sync_at = t
        pre.append(t - read_at)
        threads.add(comm)
    elif name == 'syscalls:sys_exit_fdatasync' and sync_at:
        synced_at = t
        sync.append(t - sync_at)
    elif name in ('syscalls:sys_enter_writev', 'syscalls:sys_enter_write') and read_at:
        hub.append(t - read_at)
        if synced_at:
            post.append(t - synced_at)
        read_at, last_ack = None, t
def row(label, xs):
    if not xs:
        print(f"| {label} | - | - | - | - | 0 |")
        return
    s = sorted(xs)
    q = lambda p: s[min(len(s) - 1, int(len(s) * p))] * 1e6
    print(f"| {label} | {statistics.median(xs)*1e6:.0f} | {q(.9):.0f} | {q(.99):.0f} | {statistics.mean(xs)*1e6:.0f} | {len(xs)} |")
print("| per message (µs) | p50 | p90 | p99 | mean | n |")
print("|---|---|---|---|---|---|")
row(f"{'hub' if sys.argv[2] == 'edgehub' else 'broker'}: read → acknowledgement written", hub)
row("  read → fdatasync starts", pre)
row("  fdatasync", sync)
row("  fdatasync ends → acknowledgement written", post)
row("client: acknowledgement → next message", client)
print(f"fdatasync called by: {', '.join(sorted(threads)) or 'nothing traced'}")
PYEOF
