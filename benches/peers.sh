#!/usr/bin/env bash
# edgehub against peer MQTT brokers on this machine (issue 5).
#
#   benches/peers.sh [--quick] [--runs N] [--brokers LIST] [--workloads LIST] [--transports LIST]
#                    [--out DIR] [--no-crash] [--no-workloads] [--no-install]
#
# Installs (Debian packages, as root) and starts on loopback, each on an empty
# data directory, with the configurations in benches/peers/: mosquitto in
# memory, mosquitto with persistence, RabbitMQ's MQTT plugin (durable,
# prefetch 100), NATS JetStream's MQTT, and edgehub (routes p{i} -> r{i},
# f{i} -> fan). Drives each with our ordered load generator
# (benches/src/bin/loadgen.rs) through W1 (8->8 pairs), W2 (8->1 fan-in) and
# W3 (one stream), 256-byte payloads, once over TLS (the peers with a CA this
# script makes with openssl; edgehub with its own CA) and once over plain TCP.
# Then the kill -9 checks C1 and C2 for every broker (plain TCP). Measures the
# raw fdatasync rate of the data disk at the start and the end. Writes raw
# JSON per run, summary.md, results.json and chart.png to the output
# directory, and prints the table of ratios.
#
# --workloads "W2" / --transports "tls": only those (default "W1 W2 W3", "tls plain").
# --quick: small counts, ONE peer (mosquitto in memory) and edgehub, for CI.
# Exit status: 1 if any workload run lost, duplicated-as-lost or reordered a
# message or failed; the crash checks are recorded, never fail the run
# (mosquitto is expected to lose acknowledged messages there).
# Every process started here is stopped by PID on exit, also on failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONF="$ROOT/benches/peers"
QUICK=0
RUNS=""
BROKERS=""
OUT=""
CRASH=1
INSTALL=1
WORKLOADS=1
WLIST="W1 W2 W3"
TRANSPORTS="tls plain"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --runs) RUNS="$2"; shift ;;
    --brokers) BROKERS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --workloads) WLIST="$2"; shift ;;
    --transports) TRANSPORTS="$2"; shift ;;
    --no-crash) CRASH=0 ;;
    --no-install) INSTALL=0 ;;
    --no-workloads) WORKLOADS=0 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "peers.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$QUICK" = 1 ]; then
  : "${RUNS:=1}"; : "${BROKERS:=edgehub mosquitto-mem}"
  N_PAIRS=2000; N_STREAM=10000; C1_N=1000; C2_N=2000; C2_RATE=1000; GRACE=3; C1_WAIT=1; C2_KILL_AFTER=1; FSYNC_SECS=2
  : "${OUT:=$ROOT/target/bench-results/peers-quick}"
else
  : "${RUNS:=3}"; : "${BROKERS:=edgehub mosquitto-mem mosquitto-persist rabbitmq nats}"
  N_PAIRS=20000; N_STREAM=100000; C1_N=10000; C2_N=20000; C2_RATE=2000; GRACE=10; C1_WAIT=5; C2_KILL_AFTER=3; FSYNC_SECS=5
  : "${OUT:=$ROOT/benches/results/peers-$(date -u +%F)}"
fi
mkdir -p "$OUT/raw"
rm -f "$OUT"/raw/*.json
LOG="$OUT/run.log"
: > "$LOG"
say() { echo "[peers $(date -u +%T)] $*" | tee -a "$LOG" >&2; }

# ---------------------------------------------------------------- processes
PIDS=()
tree_of() { # pid and all descendants
  local p="$1" c
  echo "$p"
  for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do tree_of "$c"; done
}
kill_tree() { # kill_tree SIGNAL PID
  local t
  t="$(tree_of "$2" | tr '\n' ' ')"
  # shellcheck disable=SC2086
  kill "-$1" $t 2>/dev/null || true
}
stop_pid() { # TERM the tree, wait up to 20 s, then KILL
  local pid="$1" i
  kill -0 "$pid" 2>/dev/null || return 0
  kill_tree TERM "$pid"
  for i in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill_tree KILL "$pid"
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  PIDS=()
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
forget_pid() { local keep=() p; for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; PIDS=("${keep[@]}"); }
wait_port() { # wait_port PORT SECS
  local i
  for i in $(seq 1 $(( $2 * 10 ))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- install and build
need_pkgs=(mosquitto openssl fonts-dejavu-core procps)
case " $BROKERS " in *" rabbitmq "*) need_pkgs+=(rabbitmq-server) ;; esac
case " $BROKERS " in *" nats "*) need_pkgs+=(nats-server) ;; esac
if [ "$INSTALL" = 1 ]; then
  missing=()
  for p in "${need_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then echo "peers.sh: need root to install ${missing[*]}" >&2; exit 2; fi
    say "installing ${missing[*]}"
    # Never let the packages start their services (we start the brokers by hand on loopback).
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1; fi
    apt-get update -qq >>"$LOG" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  fi
fi
say "building edgehub and the load generator (bench profile: the release settings, reusing what cargo bench built)"
(cd "$ROOT" && cargo build --profile bench -q --locked -p hub && cargo build --profile bench -q --locked -p benches --no-default-features --bin loadgen --bin peers_report) 2>&1 | tee -a "$LOG" >&2
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
EDGEHUB="$TARGET/release/edgehub"
LOADGEN="$TARGET/release/loadgen"
REPORT="$TARGET/release/peers_report"

BENCH_PARENT="${EDGEHUB_BENCH_DIR:-$TARGET/bench-tmp}"
mkdir -p "$BENCH_PARENT"
WORK="$(mktemp -d "$BENCH_PARENT/peers.XXXXXX")"
trap 'rc=$?; for pid in "${PIDS[@]}"; do stop_pid "$pid"; done; PIDS=(); rm -rf "$WORK"; exit $rc' EXIT
say "data under $WORK; results to $OUT"

"$REPORT" info "$WORK" > "$OUT/raw/info.json"
"$REPORT" fsync "$WORK" start "$FSYNC_SECS" > "$OUT/raw/fsync-start.json"

# ---------------------------------------------------------------- TLS for the peers
TLS="$WORK/tls"
mkdir -p "$TLS"
(
  cd "$TLS"
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=edgehub peers bench CA" -out ca.pem
  openssl ecparam -name prime256v1 -genkey -noout -out server.key
  openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 -extfile ext.cnf -out server.pem
  chmod 644 server.key
) >>"$LOG" 2>&1

# ---------------------------------------------------------------- brokers
# start_broker NAME TRANSPORT DATA: starts it, sets BROKER_PID, PORT, CA_ARGS (loadgen flags).
EPMD_PID=""
start_broker() {
  local name="$1" transport="$2" data="$3" tlsblock=""
  mkdir -p "$data"
  CA_ARGS=()
  case "$name" in
    mosquitto-mem|mosquitto-persist)
      PORT=21883
      [ "$transport" = tls ] && tlsblock="certfile $TLS/server.pem\nkeyfile $TLS/server.key"
      local src="$CONF/mosquitto.conf"; [ "$name" = mosquitto-persist ] && src="$CONF/mosquitto-persistent.conf"
      sed -e "s#@PORT@#$PORT#; s#@DATA@#$data#; s#@TLS@#$tlsblock#" "$src" > "$data/mosquitto.conf"
      mosquitto -c "$data/mosquitto.conf" >>"$data/broker.log" 2>&1 &
      BROKER_PID=$!
      ;;
    rabbitmq)
      PORT=21885
      cp "$CONF/rabbitmq.conf" "$data/rabbitmq.conf"
      if [ "$transport" = tls ]; then
        printf 'mqtt.listeners.tcp = none\nmqtt.listeners.ssl.1 = 127.0.0.1:%s\nssl_options.cacertfile = %s\nssl_options.certfile = %s\nssl_options.keyfile = %s\nssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n' \
          "$PORT" "$TLS/ca.pem" "$TLS/server.pem" "$TLS/server.key" >> "$data/rabbitmq.conf"
      else
        printf 'mqtt.listeners.tcp.1 = 127.0.0.1:%s\n' "$PORT" >> "$data/rabbitmq.conf"
      fi
      if [ -z "$EPMD_PID" ]; then
        epmd -address 127.0.0.1 -port 24369 >>"$WORK/epmd.log" 2>&1 &
        EPMD_PID=$!
        PIDS+=("$EPMD_PID")
        sleep 0.3
      fi
      [ -f "$data/.erlang.cookie" ] || { head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$data/.erlang.cookie"; chmod 400 "$data/.erlang.cookie"; }
      env HOME="$data" ERL_EPMD_PORT=24369 ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_CONF_ENV_FILE=/dev/null \
        RABBITMQ_NODENAME=ehbench@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_DIST_PORT=25673 \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        RABBITMQ_CONFIG_FILE="$data/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$data/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$CONF/rabbitmq-enabled-plugins" \
        RABBITMQ_MNESIA_BASE="$data/mnesia" RABBITMQ_LOG_BASE="$data/log" RABBITMQ_PID_FILE="$data/rabbit.pid" \
        /usr/lib/rabbitmq/bin/rabbitmq-server >>"$data/broker.log" 2>&1 &
      BROKER_PID=$!
      ;;
    nats)
      PORT=21886
      [ "$transport" = tls ] && tlsblock="tls { cert_file: \"$TLS/server.pem\", key_file: \"$TLS/server.key\" }"
      sed -e "s#@PORT@#$PORT#; s#@NATSPORT@#24222#; s#@DATA@#$data#; s#@TLS@#$tlsblock#" "$CONF/nats.conf" > "$data/nats.conf"
      nats-server -c "$data/nats.conf" >>"$data/broker.log" 2>&1 &
      BROKER_PID=$!
      ;;
    edgehub)
      local tls_port=21893 plain_port=21894
      # Each subcommand takes its own flags: identity ones for both, listeners for run only.
      local args=(--data-dir "$data/hub" --manifest "$CONF/edgehub-manifest.json" --log warn)
      local run_args=(--mqtt-addr "127.0.0.1:$tls_port" --metrics-addr "127.0.0.1:21899"
                      --plain-mqtt-addr "127.0.0.1:$plain_port")
      if [ ! -f "$data/keys.txt" ]; then
        local m
        for m in p0 p1 p2 p3 p4 p5 p6 p7 r0 r1 r2 r3 r4 r5 r6 r7 f0 f1 f2 f3 f4 f5 f6 f7 fan; do
          "$EDGEHUB" connection-string "$m" "${args[@]}"
        done > "$data/keys.txt"
      fi
      "$EDGEHUB" run "${args[@]}" "${run_args[@]}" >>"$data/broker.log" 2>&1 &
      BROKER_PID=$!
      CA_ARGS=(--target edgehub --keys "$data/keys.txt" --metrics-addr 127.0.0.1:21899)
      if [ "$transport" = tls ]; then PORT=$tls_port; else PORT=$plain_port; fi
      ;;
    *) echo "unknown broker $name" >&2; return 1 ;;
  esac
  PIDS+=("$BROKER_PID")
  if [ "$transport" = tls ]; then
    if [ "$name" = edgehub ]; then CA_ARGS+=(--tls-ca "$("$EDGEHUB" ca-path --data-dir "$data/hub")"); else CA_ARGS+=(--tls-ca "$TLS/ca.pem"); fi
  fi
  if ! wait_port "$PORT" 90; then
    say "$name did not open port $PORT; its log:"; tail -20 "$data/broker.log" >&2 || true
    return 1
  fi
  # RabbitMQ opens its listener before the MQTT plugin is fully up; give every broker a moment.
  sleep 1
}

FAILED=0
loadgen() { # loadgen LABEL JSON ARGS...: never aborts the script
  local label="$1" json="$2"; shift 2
  # In the background so that a signal to this script interrupts `wait` and runs the cleanup.
  "$LOADGEN" --addr "127.0.0.1:$PORT" "${CA_ARGS[@]}" --broker-pid "$BROKER_PID" --label "$label" \
    --json "$json" "$@" >/dev/null 2>>"$LOG.tmp" &
  local lp=$! rc=0
  PIDS+=("$lp")
  wait "$lp" || rc=$?
  forget_pid "$lp"
  cat "$LOG.tmp" | tee -a "$LOG" >&2; rm -f "$LOG.tmp"
  return $rc
}

workloads() { # workloads BROKER TRANSPORT
  local b="$1" t="$2" data="$WORK/$1-$2" run w
  say "== $b over $t"
  if ! start_broker "$b" "$t" "$data"; then FAILED=1; stop_pid "$BROKER_PID"; forget_pid "$BROKER_PID"; return; fi
  for run in $(seq 1 "$RUNS"); do
    for w in $WLIST; do
      local args=()
      case $w in
        W1) args=(-p 8 -n "$N_PAIRS" --mode pairs) ;;
        W2) args=(-p 8 -n "$N_PAIRS" --mode fanin) ;;
        W3) args=(-p 1 -n "$N_STREAM" --mode pairs) ;;
      esac
      loadgen "$b/$t/$w/$run" "$OUT/raw/$b--$t--$w--$run.json" "${args[@]}" -b 256 --window 100 --grace "$GRACE" --timeout 300 \
        || { FAILED=1; say "FAILED: $b $t $w run $run"; }
    done
  done
  stop_pid "$BROKER_PID"; forget_pid "$BROKER_PID"
  rm -rf "$data"
}

crash_checks() { # crash_checks BROKER
  local b="$1" data="$WORK/$1-crash" run_id
  say "== $b: kill -9 checks"
  # C1: 4 x C1_N acknowledged while the receivers are offline; SIGKILL; restart; receivers return.
  rm -rf "$data"
  start_broker "$b" plain "$data" || { FAILED=1; stop_pid "$BROKER_PID"; forget_pid "$BROKER_PID"; return; }
  run_id=$(( $(date +%s%N) % 1000000000000 ))
  loadgen "$b/crash/C1-publish/1" "$OUT/raw/$b--crash--C1-publish.json" --phase publish --run-id "$run_id" \
    -p 4 -n "$C1_N" --mode pairs --grace "$GRACE" --timeout 120 || say "$b C1: publish phase did not complete"
  kill_tree KILL "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true; forget_pid "$BROKER_PID"
  start_broker "$b" plain "$data" || { FAILED=1; stop_pid "$BROKER_PID"; forget_pid "$BROKER_PID"; return; }
  sleep "$C1_WAIT"
  loadgen "$b/crash/C1/1" "$OUT/raw/$b--crash--C1.json" --phase receive --run-id "$run_id" \
    -p 4 -n "$C1_N" --mode pairs --grace "$GRACE" --timeout 120 || true
  stop_pid "$BROKER_PID"; forget_pid "$BROKER_PID"
  # C2: 2 publishers at C2_RATE msg/s; SIGKILL mid-stream, immediate restart; unacknowledged messages resent.
  rm -rf "$data"
  start_broker "$b" plain "$data" || { FAILED=1; stop_pid "$BROKER_PID"; forget_pid "$BROKER_PID"; return; }
  local first_pid="$BROKER_PID"
  "$LOADGEN" --addr "127.0.0.1:$PORT" "${CA_ARGS[@]}" --label "$b/crash/C2/1" --json "$OUT/raw/$b--crash--C2.json" \
    -p 2 -n "$C2_N" --rate "$C2_RATE" --crash-tolerant --mode pairs --grace "$GRACE" --timeout 180 >/dev/null 2>>"$LOG.c2" &
  local lg=$!
  PIDS+=("$lg")
  sleep "$C2_KILL_AFTER"
  kill_tree KILL "$first_pid"; wait "$first_pid" 2>/dev/null || true; forget_pid "$first_pid"
  start_broker "$b" plain "$data" || FAILED=1
  wait "$lg" || true; forget_pid "$lg"
  cat "$LOG.c2" | tee -a "$LOG" >&2; rm -f "$LOG.c2"
  stop_pid "$BROKER_PID"; forget_pid "$BROKER_PID"
  rm -rf "$data"
}

if [ "$WORKLOADS" = 1 ]; then
  for b in $BROKERS; do
    for t in $TRANSPORTS; do workloads "$b" "$t"; done
  done
fi
if [ "$CRASH" = 1 ]; then
  for b in $BROKERS; do crash_checks "$b"; done
fi
if [ -n "$EPMD_PID" ]; then stop_pid "$EPMD_PID"; forget_pid "$EPMD_PID"; fi

"$REPORT" fsync "$WORK" end "$FSYNC_SECS" > "$OUT/raw/fsync-end.json"
"$REPORT" summarize "$OUT" | tee -a "$LOG"
if [ "$FAILED" != 0 ]; then say "some workload runs FAILED (see above)"; exit 1; fi
say "done: $OUT"
