#!/usr/bin/env bash
# One Node SDK sender over AMQP versus the same sender over MQTT, against one edgehub, in one
# run: msgs/s of `send.js` (sendOutputEvent one at a time, each awaited: the SDK's own pace),
# alternating the transports ROUNDS times so drift on the machine hits both alike.
#   tests/sdk/amqp_vs_mqtt.sh [COUNT] [ROUNDS]      (root; SDKs from scripts/install-sdks.sh)
# Env: EDGEHUB_BIN (default: the release binary under $CARGO_TARGET_DIR or target/),
# EDGEHUB_SDK_DIR. Prints one line per run and the medians and their ratio.
set -euo pipefail
cd "$(dirname "$0")/../.."
COUNT=${1:-5000}
ROUNDS=${2:-3}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${EDGEHUB_BIN:-$TARGET/release/edgehub}
[ -x "$BIN" ] || { echo "no edgehub binary at $BIN (cargo build --release -p hub)" >&2; exit 2; }
export EDGEHUB_SDK_DIR=${EDGEHUB_SDK_DIR:-/var/tmp/edgehub-sdk}

NS=ehbench-$$
WORK=$(mktemp -d)
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
HUB_PID=
cleanup() {
  [ -n "$HUB_PID" ] && kill "$HUB_PID" 2>/dev/null && wait "$HUB_PID" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Each subcommand takes its own flags: the hub's identity for connection-string and run,
# listeners for run only; ca-path needs only the data directory.
ARGS=(--data-dir "$WORK/data" --gateway-hostname 127.0.0.1 --iothub-hostname edgehub.local
      --device-id edge-device --log warn)
RUN_ARGS=(--mqtt-addr 127.0.0.1:8883 --amqp-addr 127.0.0.1:5671 --metrics-addr 127.0.0.1:9600)
CS=$("$BIN" connection-string sender "${ARGS[@]}")
CA=$("$BIN" ca-path --data-dir "$WORK/data")
ip netns exec "$NS" "$BIN" run "${ARGS[@]}" "${RUN_ARGS[@]}" 2>"$WORK/hub.log" &
HUB_PID=$!
for _ in $(seq 100); do
  ip netns exec "$NS" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9600 && printf "GET /readyz HTTP/1.0\r\n\r\n" >&3 && grep -q " 200 " <&3' 2>/dev/null && break
  sleep 0.1
done

echo "edgehub $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs, $COUNT messages per run, Node SDK send.js (one sendOutputEvent awaited at a time); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A RATES
for r in $(seq "$ROUNDS"); do
  for t in mqtt amqp; do
    out=$(EDGEHUB_CS="$CS" EDGEHUB_CA="$CA" ip netns exec "$NS" node tests/sdk/node/send.js \
      --transport "$t" --run "$t$r" --count "$COUNT" --timeout 600)
    rate=$(printf '%s\n' "$out" | python3 -c '
import json, sys
lines = [json.loads(l) for l in sys.stdin if l.strip()]
first = next(l["ms"] for l in lines if "seq" in l)
done = next(l for l in lines if l.get("event") == "done")
n, last = done["sent"], done["ms"]
print(round((n - 1) * 1000 / max(1, last - first)))')
    echo "round $r $t: $rate msgs/s"
    RATES[$t]="${RATES[$t]:-} $rate"
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
M=$(echo "${RATES[mqtt]}" | median)
A=$(echo "${RATES[amqp]}" | median)
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "median: MQTT $M msgs/s, AMQP $A msgs/s, AMQP/MQTT = $(python3 -c "print(f'{$A/$M:.2f}')")"
