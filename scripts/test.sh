#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with the Rust toolchain: installs what the
# tests need, then runs every crate's tests and a quick pass of every benchmark (so the harness
# never rots; the figures of a quick pass are not meaningful).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v strace >/dev/null || need_apt+=(strace)
command -v mount >/dev/null || need_apt+=(mount)
# prlimit runs the hub out of file descriptors (hub/tests/connection_limits.rs).
command -v prlimit >/dev/null || need_apt+=(util-linux)
# A broker we did not write, for the upstream check (hub/tests/upstream_mosquitto.rs).
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
# The images under podman, with runc (hub/tests/podman_hub.rs, k8s/images/).
command -v podman >/dev/null || need_apt+=(podman)
command -v runc >/dev/null || need_apt+=(runc)
# hub/tests/kube_play.rs: pods publish their ports through slirp4netns; the module image it
# builds holds Debian's python3.11.
command -v slirp4netns >/dev/null || need_apt+=(slirp4netns)
[ -x /usr/bin/python3.11 ] || need_apt+=(python3.11)
# Instruction counts per message (benches/callgrind.sh), run in the quick pass below.
command -v valgrind >/dev/null || need_apt+=(valgrind)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# promtool evaluates k8s/README.md's autoscaling recording rule (k8s/chart/tests/test_chart.py).
# It comes only with Debian's prometheus package: installed without its recommends (exporters)
# and without starting the daemon (policy-rc.d answers "not now"), so no server runs beside
# the tests.
if ! command -v promtool >/dev/null; then
  echo "== installing Debian's prometheus package for promtool (the daemon is not started)"
  export DEBIAN_FRONTEND=noninteractive
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  [ ${#need_apt[@]} -gt 0 ] || apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  [ "$made_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
fi

echo "== official Azure IoT SDKs (pinned Python and Node clients for the hub's tests)"
scripts/install-sdks.sh

echo "== Helm chart test tools (pinned helm-python-sdk and kubernetes-validate, for k8s/tests/chart.rs)"
scripts/install-chart-tools.sh

echo "== cargo test (workspace), two test binaries at a time (scripts/run-tests.py)"
python3 scripts/run-tests.py

echo "== fuzz targets, 2000 runs each from the committed corpora (tests/fuzz/README.md)"
scripts/fuzz.sh --runs 2000 --dev

echo "== benchmarks, quick pass"
cargo bench -p benches --bench store --locked -- --quick
cargo bench -p benches --bench router --locked -- --quick
cargo bench -p benches --bench upstream --locked -- --quick
benches/peers.sh --quick
benches/callgrind.sh -n 300 "${CARGO_TARGET_DIR:-target}/release/edgehub"
# Module replicas (about 45 s): one round of 1, 2, 3 replicas and one join, leave and kill.
cargo build --profile bench -q --locked -p benches --bin replbench
"${CARGO_TARGET_DIR:-target}/release/replbench" --rounds 1 --secs 2 --warmup 1 --handoffs 1 --observe 5
# An offline backlog (issue 18; about 5 s): 16 and 48 MiB, SIGKILL, reopen, drain in order.
cargo build --profile bench -q --locked -p benches --bin backlog
"${CARGO_TARGET_DIR:-target}/release/backlog" --quick
