#!/usr/bin/env bash
# Proves the SDK test harness without the hub (not part of cargo test; needs root):
#   1. scripts/install-sdks.sh (the pinned SDKs);
#   2. in a fresh network namespace where nothing listens, every script of both SDKs fails
#      cleanly: the documented exit code, the `edgehub-sdk …: error=…` stderr line, in time;
#   3. usage errors (no CA, no connection string) are exit 2;
#   4. Mosquitto with TLS on 127.0.0.1:8883 stands in for the hub, with a CA made by openssl:
#      both SDKs send and receive through it (topics, properties, connection ids, a
#      non-UTF-8 body, Node's drop of an input topic with no property-bag segment), a wrong
#      CA is exit 6, and a broker that refuses the credentials is exit 4;
#   5. hub/tests/support/sdk.rs, built in a throw-away crate with tests/sdk/rust_selftest.rs,
#      against the same stand-in (namespaces in parallel, deadlines, sequence checks).
# Ends with "N passed, N failed"; exit 0 only when nothing failed.
# Options: --no-rust (skip step 5), --keep (keep the work folder for a look).
set -uo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
export EDGEHUB_SDK_DIR="${EDGEHUB_SDK_DIR:-/var/tmp/edgehub-sdk}"
py="$EDGEHUB_SDK_DIR/venv/bin/python"
pyd="$repo/tests/sdk/python"
nd="$repo/tests/sdk/node"
rust=1 keep=0
for a in "$@"; do
  case "$a" in
    --no-rust) rust=0 ;;
    --keep) keep=1 ;;
    *) echo "selftest: unknown option $a" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then echo "selftest: needs root (ip netns)" >&2; exit 2; fi

echo "== install the SDKs"
"$repo/scripts/install-sdks.sh" || { echo "selftest: install-sdks.sh failed" >&2; exit 1; }

need=()
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || { echo "selftest: apt-get install ${need[*]} failed" >&2; exit 1; }
fi

work="$(mktemp -d /tmp/edgehub-sdk-selftest.XXXXXX)"
namespaces=() pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for n in "${namespaces[@]}"; do ip netns del "$n" 2>/dev/null; done
  if [ "$keep" = 1 ]; then echo "work folder kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

passed=0 failed=0
ok() { echo "ok   - $*"; passed=$((passed + 1)); }
bad() { echo "FAIL - $*"; failed=$((failed + 1)); }

new_ns() { # new_ns VAR: a fresh namespace with lo up, its name in VAR
  local n="edgehub-selftest-$$-$1"
  ip netns add "$n" && ip -n "$n" link set lo up || { echo "selftest: ip netns add $n failed" >&2; exit 1; }
  namespaces+=("$n")
  printf -v "$1" '%s' "$n"
}

# expect NAME CODE MAX_SECONDS NS [ENV=V ...] -- CMD...: runs CMD in namespace NS (with env),
# checks the exit code, that it ended within MAX_SECONDS, and for CODE != 0 the stderr line.
expect() {
  local name="$1" want="$2" max="$3" ns="$4"; shift 4
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout $((max + 15)) ip netns exec "$ns" env "${envs[@]}" "$@" >"$work/$name.out" 2>"$work/$name.err"
  rc=$?
  t1=$(date +%s.%N)
  local took; took=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
  local line; line=$(grep '^edgehub-sdk ' "$work/$name.err" | tail -1)
  if [ "$rc" != "$want" ]; then
    bad "$name: exit $rc, want $want (${took}s); stderr: $(tail -3 "$work/$name.err")"
  elif awk -v t="$took" -v m="$max" 'BEGIN{exit !(t > m)}'; then
    bad "$name: exit $rc but took ${took}s > ${max}s"
  elif [ "$want" != 0 ] && ! [[ "$line" =~ ^edgehub-sdk\ [a-z_]+\.(py|js):\ error=[a-z]+\ exit=$want:\  ]]; then
    bad "$name: exit $rc but no proper error line: '$line'"
  else
    ok "$name: exit $rc in ${took}s${line:+ — ${line:0:150}}"
  fi
}

# jcheck NAME FILE PYTHON-EXPR: D = the data lines, E = the event lines of FILE's JSON lines.
jcheck() {
  local name="$1" file="$2" expr="$3" res
  res=$(python3 - "$file" "$expr" <<'EOF'
import json, sys
L = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
D = [x for x in L if "event" not in x]
E = [x for x in L if "event" in x]
try:
    r = eval(sys.argv[2])
except Exception as e:
    r = f"error {e!r}"
print("yes" if r is True else f"no: {r!r}; data={D!r}")
EOF
)
  if [ "$res" = yes ]; then ok "$name"; else bad "$name: $res"; fi
}

wait_for() { # wait_for SECONDS CMD...: polls CMD every 50 ms until it succeeds
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 0.05
  done
}

KEY=c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0
cs() { echo "HostName=acceptance-hub.local;DeviceId=edgedev;ModuleId=$1;SharedAccessKey=$KEY;GatewayHostName=127.0.0.1"; }

echo "== certificates (openssl): a CA, a server certificate for 127.0.0.1/localhost, another CA"
(
  cd "$work" || exit 1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
    -days 2 -subj /CN=edgehub-selftest-ca -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign &&
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key \
    -out server.csr -subj /CN=127.0.0.1 &&
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' >ext.cnf &&
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
    -days 2 -extfile ext.cnf &&
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout other-ca.key \
    -out other-ca.pem -days 2 -subj /CN=some-other-ca
) >"$work/openssl.log" 2>&1 || { cat "$work/openssl.log"; exit 1; }
ca="$work/ca.pem"

echo "== namespaces"
new_ns empty
if [ "$(ip -n "$empty" -o link | wc -l)" = 1 ] && ip -n "$empty" -o link | grep -q 'lo:.*UP'; then
  ok "ip netns add + lo up: $empty has only lo, up"
else
  bad "namespace $empty: $(ip -n "$empty" -o link)"
fi
ip netns add "edgehub-selftest-$$-del" && ip netns del "edgehub-selftest-$$-del"
if ip netns list | grep -q "edgehub-selftest-$$-del"; then bad "ip netns del left the namespace"; else ok "ip netns add/del"; fi

echo "== nothing listens on 127.0.0.1:8883 in $empty"
for s in send receive connect_only; do
  expect "py-$s-refused" 3 8 "$empty" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- "$py" "$pyd/$s.py" --timeout 8
  expect "node-$s-refused" 3 8 "$empty" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- node "$nd/$s.js" --timeout 8
done
# Node's AMQP transport retries open() under its default policy: the script's deadline ends it.
expect "node-send-amqp-retries-until-timeout" 5 8 "$empty" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- node "$nd/send.js" --transport amqp --timeout 3
expect "node-send-amqp-no-retry" 3 8 "$empty" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- node "$nd/send.js" --transport amqp --no-retry --timeout 8

echo "== usage errors"
expect "py-no-ca" 2 8 "$empty" EDGEHUB_CS="$(cs modA)" -- "$py" "$pyd/send.py"
expect "node-no-ca" 2 8 "$empty" EDGEHUB_CS="$(cs modA)" -- node "$nd/send.js"
expect "py-no-cs" 2 8 "$empty" EDGEHUB_CA="$ca" -- "$py" "$pyd/receive.py"
expect "node-no-cs" 2 8 "$empty" EDGEHUB_CA="$ca" -- node "$nd/receive.js"
expect "py-no-gateway" 2 8 "$empty" EDGEHUB_CS="HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey=$KEY" EDGEHUB_CA="$ca" -- "$py" "$pyd/send.py"
expect "py-expired-sas" 2 8 "$empty" EDGEHUB_SAS="SharedAccessSignature sr=h%2Fdevices%2Fd%2Fmodules%2Fm&sig=x&se=1" EDGEHUB_CA="$ca" -- "$py" "$pyd/connect_only.py"
expect "py-system-python-without-sdk" 2 8 "$empty" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" PYTHONPATH= -- /usr/bin/env -i /usr/bin/python3 -S "$pyd/send.py"

echo "== Mosquitto with TLS on 127.0.0.1:8883 as the stand-in hub"
mosq_conf() { # mosq_conf NAME EXTRA-LINES
  cat >"$work/mosq-$1.conf" <<EOF
user root
per_listener_settings false
persistence false
log_type all
log_dest file $work/mosq-$1.log
$2
listener 8883 127.0.0.1
cafile $work/ca.pem
certfile $work/server.pem
keyfile $work/server.key
EOF
}
mosq_conf open "allow_anonymous true"
: >"$work/passwd" && mosquitto_passwd -b "$work/passwd" nobody-we-know x >/dev/null 2>&1 && chmod 600 "$work/passwd"
mosq_conf auth "allow_anonymous false
password_file $work/passwd"
new_ns open
new_ns auth
ip netns exec "$open" mosquitto -c "$work/mosq-open.conf" 2>"$work/mosq-open.err" & pids+=($!)
ip netns exec "$auth" mosquitto -c "$work/mosq-auth.conf" 2>"$work/mosq-auth.err" & pids+=($!)
port_open() { ip netns exec "$1" bash -c 'exec 3<>/dev/tcp/127.0.0.1/8883'; }
if wait_for 10 port_open "$open" && wait_for 10 port_open "$auth"; then
  ok "two Mosquittos on 127.0.0.1:8883 at once, in $open and $auth"
else
  bad "mosquitto did not listen: $(cat "$work"/mosq-*.err)"
fi
# and still nothing in the empty namespace
if port_open "$empty" 2>/dev/null; then bad "8883 reachable in $empty"; else ok "8883 not reachable from $empty"; fi

# The broker sees the module outputs.
ip netns exec "$open" mosquitto_sub -h 127.0.0.1 -p 8883 --cafile "$ca" -q 1 -v -C 6 -W 30 \
  -i selftest-sub -t 'devices/+/modules/+/messages/events/#' >"$work/sub.out" 2>"$work/sub.err" &
sub_pid=$!; pids+=($sub_pid)
wait_for 10 grep -q 'Received SUBSCRIBE from selftest-sub' "$work/mosq-open.log" || bad "mosquitto_sub did not subscribe"
expect "py-send-3" 0 15 "$open" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- "$py" "$pyd/send.py" --count 3 --run py --prop 'k=v w'
jcheck "py-send-3: seq 0..2 acked in order, then done" "$work/py-send-3.out" \
  '[d["seq"] for d in D] == [0,1,2] and [d["mid"] for d in D] == ["py-0","py-1","py-2"] and E[0]["event"]=="connected" and E[-1]=={"event":"done","sent":3,"ms":E[-1]["ms"]}'
expect "node-send-3" 0 15 "$open" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- node "$nd/send.js" --count 3 --run node --prop 'k=v w'
jcheck "node-send-3: seq 0..2 acked in order" "$work/node-send-3.out" '[d["seq"] for d in D] == [0,1,2] and D[2]["mid"] == "node-2"'
wait "$sub_pid"
echo "   topics the broker got:"; sed 's/^/     /' "$work/sub.out"
if grep -q '^devices/edgedev/modules/modA/messages/events/%24.on=out1&%24.mid=py-0&%24.ct=application%2Fjson&%24.ce=utf-8&k=v%20w&run=py&seq=0 {"seq":0,"run":"py"}$' "$work/sub.out"; then
  ok "Python output topic and body as the wire capture says (custom properties sorted)"
else bad "Python output topic: $(head -1 "$work/sub.out")"; fi
if grep -q '^devices/edgedev/modules/modA/messages/events/%24.on=out1&%24.mid=node-0&%24.ct=application%2Fjson&%24.ce=utf-8&seq=0&run=node&k=v%20w/ {"seq":0,"run":"node"}$' "$work/sub.out"; then
  ok "Node output topic ends with '/', custom properties in insertion order"
else bad "Node output topic: $(sed -n 4p "$work/sub.out")"; fi

# Input messages: receivers first, wait for their SUBSCRIBE in the broker's log, then publish.
pub() { ip netns exec "$open" mosquitto_pub -h 127.0.0.1 -p 8883 --cafile "$ca" -q 1 -i selftest-pub -t "$1" -m "$2"; }
publish_inputs() { # publish_inputs MODULE
  local m="$1" b="devices/edgedev/modules/$1/inputs"
  pub "$b/in1" 'no-bag-segment'
  pub "$b/in1/%24.mid=m-0&%24.ct=application%2Fjson&%24.ce=utf-8&run=st&seq=0&%24.cdid=edgedev&%24.cmid=modA" '{"seq":0}'
  pub "$b/in%202/%24.mid=m-1&%24.cid=c1&%24.uid=u1&%24.exp=2030-01-01T00%3A00%3A00Z&a%20b=c%2Fd&seq=1&%24.cdid=edgedev&%24.cmid=modA" "$(printf '\xff\xfe')"
  pub "$b/in1/" 'empty-bag'
}
for who in py node; do
  m=mod-$who
  if [ $who = py ]; then cmd=("$py" "$pyd/receive.py"); else cmd=(node "$nd/receive.js"); fi
  ip netns exec "$open" env EDGEHUB_CS="$(cs $m)" EDGEHUB_CA="$ca" "${cmd[@]}" --stay 6 \
    >"$work/$who-recv.out" 2>"$work/$who-recv.err" &
  rpid=$!; pids+=($rpid)
  if wait_for 10 grep -q "Received SUBSCRIBE from edgedev/$m" "$work/mosq-open.log"; then
    grep "SUBSCRIBE from edgedev/$m" -A1 "$work/mosq-open.log" | grep -o "devices/.*" | head -1 | sed "s/^/   $who subscribed: /"
    publish_inputs "$m"
  else bad "$who receiver did not subscribe: $(cat "$work/$who-recv.err")"; fi
  wait $rpid; rc=$?
  [ $rc = 0 ] && ok "$who-recv --stay 6: exit 0" || bad "$who-recv: exit $rc: $(tail -2 "$work/$who-recv.err")"
done
echo "   what the Python SDK handed over:"; sed 's/^/     /' "$work/py-recv.out"
echo "   what the Node SDK handed over:"; sed 's/^/     /' "$work/node-recv.out"
jcheck "py-recv: 4 messages incl. the one without a bag segment; ids from \$.cdid/\$.cmid" "$work/py-recv.out" \
  '[d["input_name"] for d in D] == ["in1","in1","in 2","in1"] and D[1]["message_id"]=="m-0" and D[1]["connection_device_id"]=="edgedev" and D[1]["connection_module_id"]=="modA" and D[1]["custom_properties"]=={"run":"st","seq":"0","$.cdid":"edgedev","$.cmid":"modA"} and D[1]["seq"]==0'
jcheck "py-recv: system properties, non-UTF-8 body as data_b64" "$work/py-recv.out" \
  'D[2]["correlation_id"]=="c1" and D[2]["user_id"]=="u1" and D[2]["expiry_time_utc"]=="2030-01-01T00:00:00Z" and D[2]["custom_properties"]["a b"]=="c/d" and D[2]["data"] is None and D[2]["data_b64"]=="//4=" and D[0]["message_id"] is None'
jcheck "node-recv: 3 messages, the one without a bag segment dropped by the SDK; input name not decoded" "$work/node-recv.out" \
  '[d["input_name"] for d in D] == ["in1","in%202","in1"] and D[0]["message_id"]=="m-0" and D[0]["connection_device_id"]=="edgedev" and D[0]["connection_module_id"]=="modA" and D[0]["seq"]==0'
jcheck "node-recv: absent system properties read as empty strings" "$work/node-recv.out" \
  'D[2]["message_id"]=="" and D[0]["correlation_id"]=="" and D[1]["correlation_id"]=="c1" and D[1]["data_b64"]=="//4="'

echo "== trust and credentials"
expect "py-connect-ok" 0 10 "$open" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- "$py" "$pyd/connect_only.py" --hold 1
jcheck "py-connect-ok: connected, held" "$work/py-connect-ok.out" 'E[0]["event"]=="connected" and E[1]=={"event":"held","still_connected":True,"ms":E[1]["ms"]}'
expect "node-connect-ok" 0 10 "$open" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- node "$nd/connect_only.js"
expect "node-connect-ok-localhost" 0 10 "$open" EDGEHUB_CS="$(cs modA | sed 's/GatewayHostName=127.0.0.1/GatewayHostName=localhost/')" EDGEHUB_CA="$ca" -- node "$nd/connect_only.js"
expect "py-wrong-ca" 6 10 "$open" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$work/other-ca.pem" -- "$py" "$pyd/connect_only.py"
expect "node-wrong-ca" 6 10 "$open" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$work/other-ca.pem" -- node "$nd/connect_only.js"
expect "py-refused-credentials" 4 10 "$auth" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- "$py" "$pyd/connect_only.py"
expect "node-refused-credentials" 4 10 "$auth" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- node "$nd/connect_only.js"
expect "py-send-refused" 4 10 "$auth" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- "$py" "$pyd/send.py"
expect "node-receive-refused" 4 10 "$auth" EDGEHUB_CS="$(cs modA)" EDGEHUB_CA="$ca" -- node "$nd/receive.js"

echo "   CONNECT lines the broker logged (client id, clean session, keep-alive, username):"
grep 'New client connected' "$work/mosq-open.log" | grep 'edgedev/modA' | sed 's/^[0-9]*: /     /' | sort -u -t'(' -k2,2 | head -2

if [ "$rust" = 1 ]; then
  echo "== hub/tests/support/sdk.rs in a throw-away crate (tests/sdk/rust_selftest.rs)"
  crate="$work/crate"
  mkdir -p "$crate/tests/support" "$crate/src"
  cp "$repo/hub/tests/support/sdk.rs" "$crate/tests/support/sdk.rs"
  cp "$repo/tests/sdk/rust_selftest.rs" "$crate/tests/selftest.rs"
  : >"$crate/src/lib.rs"
  cat >"$crate/Cargo.toml" <<'EOF'
[package]
name = "edgehub-sdk-selftest"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
serde_json = "1"

[workspace]
EOF
  # The same serde_json the workspace locks, when it is in cargo's cache.
  cp "$repo/Cargo.lock" "$crate/Cargo.lock" 2>/dev/null
  if (cd "$crate" && EDGEHUB_SELFTEST_WORK="$work" EDGEHUB_SDK_SCRIPTS="$repo/tests/sdk" \
      CARGO_TARGET_DIR="$EDGEHUB_SDK_DIR/selftest-target" cargo test --quiet -- --test-threads=4 \
      >"$work/cargo.out" 2>&1); then
    ok "sdk.rs: $(grep -E "^test result: ok. [1-9]" "$work/cargo.out" | tail -1)"
  else
    bad "sdk.rs selftest: $(tail -40 "$work/cargo.out")"
  fi
  sed -n '/^running/,$p' "$work/cargo.out" | sed 's/^/     /' | tail -15
  leftover=$(ip netns list | grep -c '^edgehub-test-' || true)
  [ "$leftover" = 0 ] && ok "no edgehub-test-* namespace left behind" || bad "$leftover edgehub-test-* namespaces left"
fi

echo
echo "selftest: $passed passed, $failed failed"
[ "$failed" = 0 ]
