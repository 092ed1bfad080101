#!/usr/bin/env bash
# An offline backlog through the hub binary (issue 18 part 2, end to end): memory and restart
# time after kill -9 must not grow with the backlog.
#
#   benches/hub_backlog.sh [--messages "1000000 11000000"] [--bytes 1000] [--out FILE]
#
# Per size: the release hub on an empty data directory (the peers' manifest, its store quota
# raised to the backlog + 2 GiB, no TTL), receivers r0..r7 subscribed then offline, and 8
# publishers p0..p7 that send N/8 messages of --bytes each over plain MQTT
# (benches/src/bin/loadgen.rs --phase publish: exits once every message is acknowledged, i.e.
# on disk). Then the hub's RSS, SIGKILL, a new hub on the same directory timed from exec to
# /readyz answering 200, and the receivers back (--phase receive): every acknowledged message
# must arrive, in order, or the run fails. The new hub's peak RSS (VmHWM: restart and the whole
# drain) and the drain rate are recorded, with the raw 4 KiB append + fdatasync rate of the same
# disk. Prints a Markdown table and writes it to --out (default
# target/bench-results/hub-backlog.md).
#
# EDGEHUB_BIN=path runs another build of the hub (e.g. an older commit's, for a before/after in
# one run). Needs curl and cargo build --profile bench -p hub -p benches --bin loadgen (peers.sh builds
# both), and ~1.1 KiB of disk per message under target/bench-tmp.
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES="1000000 11000000"
BYTES=1000
TARGET=${CARGO_TARGET_DIR:-target}
OUT=$TARGET/bench-results/hub-backlog.md
while [ $# -gt 0 ]; do
  case "$1" in
    --messages) MESSAGES="$2"; shift 2 ;;
    --bytes) BYTES="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
BIN=${EDGEHUB_BIN:-$TARGET/release/edgehub}
LOADGEN=$TARGET/release/loadgen
for b in "$BIN" "$LOADGEN"; do
  [ -x "$b" ] || { echo "no $b (cargo build --profile bench -p hub -p benches --bin loadgen)" >&2; exit 2; }
done
PORT=21793
METRICS=21799
mkdir -p "$TARGET/bench-tmp" "$(dirname "$OUT")"
W=$(mktemp -d "$TARGET/bench-tmp/hub-backlog.XXXXXX")
HUB=
cleanup() {
  [ -n "$HUB" ] && { kill -9 "$HUB" 2>/dev/null || true; wait "$HUB" 2>/dev/null || true; }
  rm -rf "$W"
}
trap cleanup EXIT

say() { echo "[hub-backlog $(date +%T)] $*" >&2; }
# Ready = /readyz answers 200: the store is open and accepts writes, the listeners serve (they
# are bound before the store opens, so an accepting port says nothing). Polled every 10 ms.
wait_ready() {
  local i
  for i in $(seq 1 $(( $1 * 100 ))); do
    if curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$METRICS/readyz"; then return 0; fi
    sleep 0.01
  done
  return 1
}
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
fsync_rate() { # raw 4 KiB append + fdatasync per second on this disk, 2 s
  python3 - "$W" <<'EOF'
import os, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
block, n, end = b"\0" * 4096, 0, time.monotonic() + 2
while time.monotonic() < end:
    os.write(fd, block); os.fdatasync(fd); n += 1
os.close(fd); os.unlink(path)
print(round(n / 2))
EOF
}
start_hub() {
  "$BIN" run "${ARGS[@]}" --plain-mqtt-addr "127.0.0.1:$PORT" --mqtt-addr 127.0.0.1:0 \
    --amqp-addr 127.0.0.1:0 --metrics-addr "127.0.0.1:$METRICS" >>"$W/hub.log" 2>&1 &
  HUB=$!
}

ROWS=()
for n in $MESSAGES; do
  per=$(( n / 8 ))
  total=$(( per * 8 ))
  data=$W/data
  rm -rf "$data" "$W/hub.log"
  quota=$(( total * (BYTES + 200) + (2 << 30) ))
  python3 - "$quota" > "$W/manifest.json" <<'EOF'
import json, sys
m = json.load(open("benches/peers/edgehub-manifest.json"))
hub = m["modulesContent"]["$edgeHub"]["properties.desired"]
hub["storeAndForwardConfiguration"]["storeLimits"] = {"maxSizeBytes": int(sys.argv[1])}
hub["storeAndForwardConfiguration"]["timeToLiveSecs"] = -1
json.dump(m, sys.stdout)
EOF
  ARGS=(--data-dir "$data" --manifest "$W/manifest.json" --log warn)
  for m in p0 p1 p2 p3 p4 p5 p6 p7 r0 r1 r2 r3 r4 r5 r6 r7; do
    "$BIN" connection-string "$m" "${ARGS[@]}"
  done > "$W/keys.txt"
  LG=(--addr "127.0.0.1:$PORT" --target edgehub --keys "$W/keys.txt" -p 8 -n "$per" --mode pairs
      -b "$BYTES" --run-id "$n" --grace 30 --timeout 3600)
  fs_before=$(fsync_rate)
  start_hub
  wait_ready 60 || { say "the hub did not get ready"; tail "$W/hub.log" >&2; exit 1; }
  say "$total messages of $BYTES B behind offline receivers"
  "$LOADGEN" "${LG[@]}" --phase publish --label "publish $total" --json "$W/publish.json" >&2
  rss_after=$(status_kib "$HUB" VmRSS)
  disk=$(du -sb "$data" | cut -f1)
  kill -9 "$HUB"; wait "$HUB" 2>/dev/null || true
  t0=$(date +%s%N)
  start_hub
  wait_ready 600 || { say "the restarted hub did not get ready"; tail "$W/hub.log" >&2; exit 1; }
  t1=$(date +%s%N)
  rss_open=$(status_kib "$HUB" VmRSS)
  say "ready $(( (t1 - t0) / 1000000 )) ms after exec; draining"
  "$LOADGEN" "${LG[@]}" --phase receive --label "receive $total" --json "$W/receive.json" >&2
  peak=$(status_kib "$HUB" VmHWM)
  kill "$HUB"; wait "$HUB" 2>/dev/null || true; HUB=
  fs_after=$(fsync_rate)
  row=$(python3 - "$W/publish.json" "$W/receive.json" "$total" "$disk" "$rss_after" "$rss_open" "$peak" \
        "$(( (t1 - t0) / 1000000 ))" "$fs_before" "$fs_after" <<'EOF'
import json, sys
pub, rec = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
total, disk, rss_after, rss_open, peak, restart_ms, fs1, fs2 = map(int, sys.argv[3:])
if rec["delivered"] < total or rec["lost"] or rec["acked_but_lost"] or rec["reordered"]:
    sys.exit(f"the drain lost or reordered messages: {rec['delivered']} of {total} delivered, "
             f"lost {rec['lost']}, acked but lost {rec['acked_but_lost']}, reordered {rec['reordered']}")
fs = min(fs1, fs2)
mib = lambda kib: f"{kib / 1024:.0f} MiB"
print(f"| {total:,} | {disk / 2**30:.2f} GiB | {pub['ack_rate']:,.0f} ({pub['ack_rate'] / fs:.1f}×) | {mib(rss_after)} "
      f"| {restart_ms:,} ms | {mib(rss_open)} | {mib(peak)} | {rec['delivery_rate']:,.0f} ({rec['delivery_rate'] / fs:.1f}×) "
      f"| {fs1:,} / {fs2:,} |")
EOF
)
  ROWS+=("$row")
  say "$row"
  rm -rf "$data"
done
{
  echo "# Offline backlog through the hub, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  if [ -n "${EDGEHUB_BIN:-}" ]; then echo "edgehub binary $BIN (EDGEHUB_BIN), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end;"
  else echo "edgehub $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end;"; fi
  echo "$BYTES-byte messages from 8 publishers to 8 offline receivers over plain MQTT, SIGKILL, restart, drain."
  echo "Rates in msgs/s with their ratio to the disk's raw 4 KiB append + fdatasync rate (the lower of the two samples)."
  echo
  echo "| messages | data directory | publish (acked) msgs/s | hub RSS after the backlog | SIGKILL → restarted hub ready (/readyz) | RSS when ready | peak RSS (restart + drain) | drain msgs/s | raw fdatasync/s before / after |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} | tee "$OUT"
