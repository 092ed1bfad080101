#!/usr/bin/env bash
# What the hub adds to a real SDK module's send, next to an in-memory mosquitto and the disk's
# own fdatasync, in one run (issue 18, part 3).
#
#   benches/sdk_stop_and_wait.sh [--count N] [--rounds R] [--sdks "python node-mqtt node-amqp"]
#
# The official SDKs send one message at a time and wait for each acknowledgement, as modules
# do. The same unmodified sender program (tests/sdk/python/send.py, tests/sdk/node/send.js)
# sends N messages to the hub (durable: acknowledged after fdatasync) and to mosquitto in memory
# (acknowledged on receipt), both behind the same TLS certificate (P-256) on 127.0.0.1:8883,
# each in a network namespace of its own (the SDKs dial 8883). Rounds alternate hub and
# mosquitto so drift on a shared machine hits both alike; each round first samples the raw
# 4 KiB append + fdatasync latency of the hub's data disk (benches' peers_report fsync).
# mosquitto routes nothing and speaks no AMQP: it is a sender-only peer, and node-amqp is
# measured against the hub only.
#
# A second hub runs with --commit-on-caller false (every write by the store's writer thread,
# the hub before issue 18's change) in a namespace of its own, on the same disk, so the change
# is measured in the same run too ("hub-thread").
# Per SDK it prints msgs/s per round, and from the medians: hub ÷ mosquitto, the time the hub
# adds per message (1/hub − 1/mosquitto) and that time ÷ the fdatasync p50 of the same run (a
# lone message cannot share its fdatasync, so about 1× is the floor). Results also go to
# $OUT (default $CARGO_TARGET_DIR/bench-results/sdk-stop-and-wait.md).
# Needs root (ip netns), mosquitto and openssl (Debian), the SDKs (scripts/install-sdks.sh) and
# the release binaries: cargo build --profile bench -p hub -p benches --bin peers_report.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=3000
ROUNDS=3
SDKS="python node-mqtt node-amqp"
while [ $# -gt 0 ]; do
  case "$1" in
    --count) COUNT="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --sdks) SDKS="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

TARGET=${CARGO_TARGET_DIR:-target}
BIN=${EDGEHUB_BIN:-$TARGET/release/edgehub}
REPORT=$TARGET/release/peers_report
for b in "$BIN" "$REPORT"; do
  [ -x "$b" ] || { echo "no $b (cargo build --profile bench -p hub -p benches --bin peers_report)" >&2; exit 2; }
done
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$MOSQUITTO" ] || { echo "no mosquitto (apt-get install mosquitto)" >&2; exit 2; }
export EDGEHUB_SDK_DIR=${EDGEHUB_SDK_DIR:-/var/tmp/edgehub-sdk}
PY=$EDGEHUB_SDK_DIR/venv/bin/python3
[ -x "$PY" ] || { echo "no SDK venv at $EDGEHUB_SDK_DIR (scripts/install-sdks.sh)" >&2; exit 2; }
OUT=${OUT:-$TARGET/bench-results/sdk-stop-and-wait.md}
mkdir -p "$(dirname "$OUT")" "$TARGET/bench-tmp"

WORK=$(mktemp -d "$TARGET/bench-tmp/sdk-saw.XXXXXX")
NS_HUB=ehsaw-hub-$$
NS_MQ=ehsaw-mq-$$
NS_HT=ehsaw-ht-$$
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  ip netns del "$NS_HUB" 2>/dev/null || true
  ip netns del "$NS_MQ" 2>/dev/null || true
  ip netns del "$NS_HT" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for ns in "$NS_HUB" "$NS_MQ" "$NS_HT"; do
  ip netns add "$ns"
  ip netns exec "$ns" ip link set lo up
done

# One certificate for both brokers, so TLS costs them the same.
benches/loopback_cert.sh "$WORK"

# The hub, durable, on the bench directory's disk.
ARGS=(--data-dir "$WORK/data" --gateway-hostname 127.0.0.1 --iothub-hostname edgehub.local
      --device-id edge-device --log warn)
CS=$("$BIN" connection-string sender "${ARGS[@]}")
ip netns exec "$NS_HUB" "$BIN" run "${ARGS[@]}" --mqtt-addr 127.0.0.1:8883 --amqp-addr 127.0.0.1:5671 \
  --metrics-addr 127.0.0.1:9600 --tls-cert "$WORK/server.pem" --tls-key "$WORK/server.key" \
  --tls-ca "$WORK/ca.pem" 2>"$WORK/hub.log" &
PIDS+=($!)
# The same hub, every write left to the store's writer thread.
ARGS_HT=(--data-dir "$WORK/data-ht" --gateway-hostname 127.0.0.1 --iothub-hostname edgehub.local
      --device-id edge-device --log warn)
CS_HT=$("$BIN" connection-string sender "${ARGS_HT[@]}")
ip netns exec "$NS_HT" "$BIN" run "${ARGS_HT[@]}" --mqtt-addr 127.0.0.1:8883 --amqp-addr 127.0.0.1:5671 \
  --metrics-addr 127.0.0.1:9600 --tls-cert "$WORK/server.pem" --tls-key "$WORK/server.key" \
  --tls-ca "$WORK/ca.pem" --commit-on-caller false 2>"$WORK/hub-thread.log" &
PIDS+=($!)
# mosquitto in memory (benches/peers/mosquitto.conf's settings), TLS on 8883.
cat > "$WORK/mosquitto.conf" <<EOF
listener 8883 127.0.0.1
certfile $WORK/server.pem
keyfile $WORK/server.key
allow_anonymous true
persistence false
max_queued_messages 0
user root
EOF
ip netns exec "$NS_MQ" "$MOSQUITTO" -c "$WORK/mosquitto.conf" 2>"$WORK/mosquitto.log" &
PIDS+=($!)
ready() { # ns port
  for _ in $(seq 200); do
    ip netns exec "$1" bash -c "exec 3<>/dev/tcp/127.0.0.1/$2" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $2 in $1: $(tail -5 "$WORK"/*.log)" >&2
  exit 1
}
ready "$NS_HUB" 8883
ready "$NS_HUB" 5671
ready "$NS_MQ" 8883
ready "$NS_HT" 8883
ready "$NS_HT" 5671

# send NS SDK RUN: msgs/s of one sender run.
send() {
  local ns=$1 sdk=$2 run=$3 out
  local CS=$CS
  [ "$ns" = "$NS_HT" ] && CS=$CS_HT
  case "$sdk" in
    python) out=$(EDGEHUB_CS="$CS" EDGEHUB_CA="$WORK/ca.pem" ip netns exec "$ns" "$PY" \
                  tests/sdk/python/send.py --run "$run" --count "$COUNT" --timeout 600) ;;
    node-mqtt|node-amqp) out=$(EDGEHUB_CS="$CS" EDGEHUB_CA="$WORK/ca.pem" ip netns exec "$ns" \
                  node tests/sdk/node/send.js --transport "${sdk#node-}" --run "$run" \
                  --count "$COUNT" --timeout 600) ;;
  esac
  printf '%s\n' "$out" | python3 -c '
import json, sys
lines = [json.loads(l) for l in sys.stdin if l.strip().startswith("{")]
seqs = [l["ms"] for l in lines if "seq" in l]
done = [l for l in lines if l.get("event") == "done"]
if not done or len(seqs) < 2:
    sys.exit("the sender did not finish")
print(round((len(seqs) - 1) * 1000 / max(1, seqs[-1] - seqs[0])))'
}
fsync_p50_us() {
  "$REPORT" fsync "$WORK/data" "round" 2 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(round(d["latency"]["p50_us"]))'
}

declare -A RATES
FSYNC=()
echo "edgehub $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs, $COUNT messages per run, $ROUNDS rounds; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  FSYNC+=("$(fsync_p50_us)")
  echo "round $r: raw 4 KiB append + fdatasync p50 ${FSYNC[-1]} µs"
  for sdk in $SDKS; do
    peers=(hub hub-thread)
    [ "$sdk" = node-amqp ] || peers=(hub hub-thread mosquitto)
    # Rotate which goes first, round by round.
    for _ in $(seq $(( (r - 1) % ${#peers[@]} ))); do peers=("${peers[@]:1}" "${peers[0]}"); done
    for peer in "${peers[@]}"; do
      case "$peer" in hub) ns=$NS_HUB ;; hub-thread) ns=$NS_HT ;; mosquitto) ns=$NS_MQ ;; esac
      rate=$(send "$ns" "$sdk" "$sdk-$peer-$r")
      echo "round $r $sdk → $peer: $rate msgs/s"
      RATES[$sdk.$peer]="${RATES[$sdk.$peer]:-} $rate"
    done
  done
done

median() { tr ' ' '\n' | { grep . || true; } | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
FS=$(printf '%s ' "${FSYNC[@]}" | median)
{
  echo "# SDK stop-and-wait: hub vs mosquitto (memory), $(date -u +%Y-%m-%d)"
  echo
  echo "edgehub $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end;"
  echo "$COUNT messages per run, $ROUNDS alternating rounds, medians. fdatasync p50 of the hub's disk in this run: $FS µs (per round: ${FSYNC[*]})."
  echo
  echo "| SDK | hub | msgs/s | ÷ mosquitto | adds per message vs mosquitto | ÷ fdatasync p50 |"
  echo "|---|---|---|---|---|---|"
  for sdk in $SDKS; do
    mq=$(echo "${RATES[$sdk.mosquitto]:-}" | median)
    for peer in hub hub-thread; do
      rate=$(echo "${RATES[$sdk.$peer]}" | median)
      label="caller commits (default)"; [ "$peer" = hub-thread ] && label="writer thread only"
      if [ -n "$mq" ]; then
        python3 -c "
hub, mq, fs = $rate, $mq, $FS
added = 1e6 / hub - 1e6 / mq
print(f'| $sdk | $label | {hub} | {hub / mq:.2f}× | {added:.0f} µs | {added / fs:.2f}× |')"
      else
        echo "| $sdk | $label | $rate | (no AMQP in mosquitto) | | |"
      fi
    done
    [ -n "$mq" ] && echo "| $sdk | mosquitto (memory) | $mq | 1× | | |"
  done
  echo
  echo "Per round (msgs/s):"
  for k in "${!RATES[@]}"; do echo "- $k:${RATES[$k]}"; done | sort
} | tee "$OUT"
