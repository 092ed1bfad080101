#!/usr/bin/env bash
# Instructions the hub executes per message, counted by valgrind's callgrind: a figure that
# does not depend on how busy the (shared) machine is, for before/after comparisons of the
# per-message path where wall-clock throughput is too noisy.
#
#   benches/callgrind.sh [--tls] [-n N] HUB_BINARY [OUT_FILE]
#
# Starts HUB_BINARY (`edgehub`) under callgrind on a fresh data directory with the benches'
# manifest, drives one W1 run through it with the load generator (8 publisher/receiver pairs,
# N messages each, 256 bytes, plain MQTT or --tls), stops the hub and prints the total
# instruction count and that divided by the messages delivered (OUT_FILE: keep callgrind's data
# there, for callgrind_annotate). Compare two binaries by running
# it on each with the same N (the total includes start-up, ~15M instructions: use N >= 6000).
# Needs valgrind (apt-get install valgrind) and the release load generator
# (cargo build --release -p benches --no-default-features --bin loadgen).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TLS=0; N=6000
while [ $# -gt 0 ]; do
  case "$1" in
    --tls) TLS=1 ;;
    -n) N="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) break ;;
  esac
  shift
done
HUB="$(realpath "$1")"; KEEP="${2:-}"
LG="${CARGO_TARGET_DIR:-$ROOT/target}/release/loadgen"
[ -x "$LG" ] || { echo "no load generator at $LG: cargo build --release -p benches --no-default-features --bin loadgen" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is not installed: apt-get install valgrind" >&2; exit 2; }
D=$(mktemp -d /var/tmp/edgehub-callgrind.XXXX)
OUTF="${KEEP:-$D/callgrind.out}"
HP=""
trap '[ -n "$HP" ] && kill -KILL "$HP" 2>/dev/null; rm -rf "$D"' EXIT
args=(--data-dir "$D/hub" --manifest "$ROOT/benches/peers/edgehub-manifest.json" --log warn)
for m in p0 p1 p2 p3 p4 p5 p6 p7 r0 r1 r2 r3 r4 r5 r6 r7 f0 f1 f2 f3 f4 f5 f6 f7 fan; do
  "$HUB" connection-string "$m" "${args[@]}"
done > "$D/keys.txt"
valgrind --tool=callgrind --callgrind-out-file="$OUTF" "$HUB" run "${args[@]}" \
  --mqtt-addr 127.0.0.1:22893 --plain-mqtt-addr 127.0.0.1:22894 --metrics-addr 127.0.0.1:22899 \
  --amqp-addr 127.0.0.1:0 > "$D/hub.log" 2>&1 &
HP=$!
PORT=22894; CA=()
if [ "$TLS" = 1 ]; then PORT=22893; CA=(--tls-ca "$("$HUB" ca-path --data-dir "$D/hub")"); fi
for _ in $(seq 1 600); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.5; done
"$LG" --addr "127.0.0.1:$PORT" "${CA[@]}" --target edgehub --keys "$D/keys.txt" --metrics-addr 127.0.0.1:22899 \
  --broker-pid "$HP" --label callgrind --json "$D/run.json" -p 8 -n "$N" --mode pairs -b 256 --window 100 \
  --grace 10 --timeout 900 > "$D/loadgen.log" 2>&1 || { echo "the load generator failed:" >&2; tail -5 "$D/loadgen.log" >&2; exit 1; }
kill -TERM "$HP"; wait "$HP" || true; HP=""
delivered=$(grep -o '"delivered": [0-9]*' "$D/run.json" | head -1 | grep -o '[0-9]*$')
total=$(grep -o 'I   refs: *[0-9,]*' "$D/hub.log" | tr -dc '0-9')
echo "instructions $total delivered $delivered per-message $((total / delivered))${KEEP:+ (callgrind data: $KEEP)}"
