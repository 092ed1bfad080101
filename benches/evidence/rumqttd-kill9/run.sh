#!/usr/bin/env bash
# Evidence: an embedded rumqttd 0.20 sends PUBACK for a QoS 1 publish and
# loses the message on kill -9, because it keeps nothing on disk.
#
#   ./run.sh                       # build, run control + crash scenario, print verdict
#   PORT=18883 DEADLINE=5 ./run.sh
#   KEEP_LOGS=1 ./run.sh           # keep broker logs even when the run succeeds
#
# Exit status: 0 = loss confirmed (control delivered, crash lost it),
#              1 = not reproduced, 2 = inconclusive / harness error.
# Everything runs on 127.0.0.1. Broker processes are tracked by PID and
# killed on exit.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/rumqttd-evidence-target}"
PORT="${PORT:-18883}"
DEADLINE="${DEADLINE:-5}"          # seconds the reconnecting subscriber waits
TOPIC="edgehub/evidence/kill9"
BIN="$CARGO_TARGET_DIR/release/rumqttd-kill9"
LOGDIR="$(mktemp -d /tmp/rumqttd-kill9.XXXXXX)"
BROKER_CWD="$LOGDIR/broker-cwd"    # empty working directory for every broker run
mkdir -p "$BROKER_CWD"
BROKER_PID=""
REMOVE_LOGS=0

log() { printf '%s %s\n' "$(date -u +%H:%M:%S.%3N)" "$*"; }

cleanup() {
    if [[ -n "$BROKER_PID" ]] && kill -0 "$BROKER_PID" 2>/dev/null; then
        kill -KILL "$BROKER_PID" 2>/dev/null
        wait "$BROKER_PID" 2>/dev/null
    fi
    BROKER_PID=""
    if (( REMOVE_LOGS )) && [[ "${KEEP_LOGS:-0}" != 1 ]]; then rm -rf "$LOGDIR"; fi
}
trap cleanup EXIT
trap 'exit 2' INT TERM

port_listening() { ss -Hltn "sport = :$PORT" 2>/dev/null | grep -q .; }

start_broker() {
    local tag="$1"
    if port_listening; then
        log "ERROR: 127.0.0.1:$PORT already in use; set PORT=..."; exit 2
    fi
    (cd "$BROKER_CWD" && exec "$BIN" broker "$PORT") >"$LOGDIR/broker-$tag.log" 2>&1 &
    BROKER_PID=$!
    local end=$((SECONDS + 10))
    until port_listening; do
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            log "ERROR: broker exited; log:"; cat "$LOGDIR/broker-$tag.log"; exit 2
        fi
        if (( SECONDS >= end )); then log "ERROR: broker not listening after 10s"; exit 2; fi
        sleep 0.05
    done
    log "broker started: pid=$BROKER_PID ($(cat /proc/$BROKER_PID/comm)) listening on 127.0.0.1:$PORT"
}

# Files (not sockets/pipes/devices) the broker has open, ignoring stdio (its log).
open_files() {
    local fd target out=""
    for fd in /proc/"$1"/fd/*; do
        case "${fd##*/}" in 0|1|2) continue ;; esac
        target="$(readlink "$fd" 2>/dev/null)" || continue
        case "$target" in /dev/*|/proc/*) continue ;; /*) out+="$target " ;; esac
    done
    echo "${out:-none}"
}

kill9_broker() {
    local pid="$BROKER_PID"
    log "   broker pid=$pid open files (excluding stdio, sockets, pipes, /dev): $(open_files "$pid")"
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null
    local rc=$?
    BROKER_PID=""
    local end=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null || port_listening; do
        if (( SECONDS >= end )); then log "ERROR: broker pid $pid still alive after kill -9"; exit 2; fi
        sleep 0.05
    done
    log "kill -9 $pid done (wait status $rc = 128+SIGKILL), process gone, port closed"
    local left; left="$(ls -A "$BROKER_CWD")"
    log "   broker working directory after kill -9: ${left:-empty}"
}

stop_broker() {  # orderly stop at the end of the control run
    local pid="$BROKER_PID"
    kill -TERM "$pid" 2>/dev/null
    local end=$((SECONDS + 5))
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < end )); do sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    BROKER_PID=""
}

check() { "$BIN" check "$@" 2>&1 | sed 's/^/    /'; return "${PIPESTATUS[0]}"; }

# ---------------------------------------------------------------- build
log "building (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
if ! (cd "$HERE" && cargo build --release --locked -q); then
    log "ERROR: build failed"; exit 2
fi
RUMQTTD_VER="$(awk '/^name = "rumqttd"$/{getline; print $3}' "$HERE/Cargo.lock" | tr -d '"')"
RUMQTTC_VER="$(awk '/^name = "rumqttc"$/{getline; print $3}' "$HERE/Cargo.lock" | tr -d '"')"
echo "== rumqttd kill -9 evidence =="
echo "date:     $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "rumqttd:  $RUMQTTD_VER (embedded via Broker::new(config), v4 listener)"
echo "rumqttc:  $RUMQTTC_VER (clients, clean_session=false)"
echo "rustc:    $(rustc --version)"
echo "host:     $(uname -srm)"
echo "port:     127.0.0.1:$PORT   topic: $TOPIC   subscriber deadline: ${DEADLINE}s"
echo "logs:     $LOGDIR (broker logs; removed on CONFIRMED unless KEEP_LOGS=1)"

# One scenario: persistent subscriber session, go offline, QoS 1 publish with
# PUBACK, then either keep the broker up (control) or kill -9 + restart (crash),
# then reconnect the subscriber with clean_session=false.
# Sets RESULT to "arrived" | "lost" | "error".
scenario() {
    local name="$1" crash="$2"
    local sub="evidence-sub-$name" pub="evidence-pub-$name"
    local payload="qos1-$name-$(date +%s%N)-$$-$RANDOM"
    echo
    echo "-- scenario: $name ($([[ $crash == yes ]] && echo 'kill -9 + restart between PUBACK and reconnect' || echo 'broker keeps running')) --"
    start_broker "$name-1"
    log "1. subscriber creates persistent session, subscribes QoS 1, disconnects"
    check subscribe-setup "$PORT" "$sub" "$TOPIC" || { RESULT=error; return; }
    log "2. publisher sends QoS 1 while the subscriber is offline"
    local out
    out="$(check publish "$PORT" "$pub" "$TOPIC" "$payload")"; local rc=$?
    echo "$out"
    if (( rc != 0 )) || ! grep -q "PUBACK received" <<<"$out"; then
        log "ERROR: no PUBACK"; RESULT=error; return
    fi
    log "   broker acknowledged payload=$payload"
    if [[ $crash == yes ]]; then
        log "3. kill -9 the broker (acknowledged message not yet delivered)"
        kill9_broker
        log "4. restart the broker (same binary, same config, same port)"
        start_broker "$name-2"
    else
        log "3. (control) no kill, broker pid=$BROKER_PID keeps running"
    fi
    log "5. subscriber reconnects with clean_session=false"
    check subscribe "$PORT" "$sub" "$payload" "$DEADLINE"; rc=$?
    case $rc in
        0) RESULT=arrived ;;
        1) RESULT=lost ;;
        *) RESULT=error ;;
    esac
    log "   scenario $name: acknowledged message $RESULT"
    stop_broker
}

scenario control no;  CONTROL="$RESULT"
scenario crash   yes; CRASH="$RESULT"

echo
echo "== summary =="
echo "control (no kill):        PUBACKed QoS 1 message $CONTROL"
echo "crash (kill -9, restart): PUBACKed QoS 1 message $CRASH"
if [[ $CONTROL == arrived && $CRASH == lost ]]; then
    echo "VERDICT: CONFIRMED - rumqttd $RUMQTTD_VER sent PUBACK for a QoS 1 message and lost it on kill -9."
    echo "         The same steps without the crash deliver it, so the loss is caused by the crash (no on-disk state)."
    REMOVE_LOGS=1
    exit 0
elif [[ $CONTROL == arrived && $CRASH == arrived ]]; then
    echo "VERDICT: NOT REPRODUCED - the message survived kill -9."
    exit 1
else
    echo "VERDICT: INCONCLUSIVE - control=$CONTROL crash=$CRASH (see $LOGDIR)"
    exit 2
fi
