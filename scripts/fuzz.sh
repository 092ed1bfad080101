#!/usr/bin/env bash
# Fuzzing with cargo-fuzz (libFuzzer) on the stable toolchain; see tests/fuzz/README.md.
#
#   scripts/fuzz.sh [--runs N | --time SECONDS] [--dev] [TARGET...]   fuzz each target in turn
#   scripts/fuzz.sh --seeds                                   rewrite the committed seed corpora
#   scripts/fuzz.sh --list                                    list the targets
#
# Default: --runs 2000 over the committed corpus, every target. --dev builds the targets
# unoptimised (4.6 min instead of 12.4 on a loaded 2-core machine, 2026-12-07; each run is
# slower, 24 s for all five targets): scripts/test.sh's quick pass.
# New inputs go to a scratch corpus (EDGEHUB_FUZZ_CORPUS, default a temporary directory), so
# the committed seeds stay small; a crash is written to tests/fuzz/artifacts/<target>/ and
# fails the script. Installs cargo-fuzz if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_DIR=tests/fuzz
TARGETS=(mqtt_packets amqp_frames route_parse manifest store_recovery)
budget=(-runs=2000)
mode=run
build=(-O -a)
selected=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) budget=("-runs=$2"); shift 2 ;;
    --time) budget=("-max_total_time=$2"); shift 2 ;;
    --seeds) mode=seeds; shift ;;
    --dev) build=(--dev); shift ;;
    --list) printf '%s\n' "${TARGETS[@]}"; exit 0 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) selected+=("$1"); shift ;;
  esac
done
[ ${#selected[@]} -gt 0 ] || selected=("${TARGETS[@]}")

if [ "$mode" = seeds ]; then
  corpus="$FUZZ_DIR/corpus"
  echo "== seeds: MQTT, AMQP and store segments from the real encoders"
  cargo run --release --locked --manifest-path "$FUZZ_DIR/seedgen/Cargo.toml" -- "$corpus"
  echo "== seeds: routes and manifests from the repository"
  mkdir -p "$corpus/route_parse" "$corpus/manifest"
  python3 "$FUZZ_DIR/seedgen/text_seeds.py" "$corpus"
  exit 0
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# Stable toolchain: `-s none` (no sanitizer; AddressSanitizer needs nightly's -Zsanitizer), so
# cargo-fuzz passes only stable rustc flags (coverage instrumentation through -C llvm-args and
# --cfg fuzzing). Memory is bounded by -rss_limit_mb and by the targets' own allocator limit
# (tests/fuzz/src/lib.rs; -malloc_limit_mb needs a sanitizer's malloc hooks), hangs by
# -timeout. `-a`: debug assertions and overflow checks on, in an optimised build.
scratch_root="${EDGEHUB_FUZZ_CORPUS:-}"
cleanup=
if [ -z "$scratch_root" ]; then
  scratch_root="$(mktemp -d)"
  cleanup="$scratch_root"
fi
trap '[ -z "$cleanup" ] || rm -rf "$cleanup"' EXIT

echo "== building fuzz targets"
cargo fuzz build --fuzz-dir "$FUZZ_DIR" -s none "${build[@]}"

for target in "${selected[@]}"; do
  scratch="$scratch_root/$target"
  mkdir -p "$scratch" "$FUZZ_DIR/corpus/$target"
  echo "== fuzz $target (${budget[*]})"
  # One process, one target at a time (libFuzzer's -jobs would fork workers logging to files).
  cargo fuzz run --fuzz-dir "$FUZZ_DIR" -s none "${build[@]}" "$target" "$scratch" "$FUZZ_DIR/corpus/$target" -- \
    "${budget[@]}" -timeout=10 -rss_limit_mb=512 -malloc_limit_mb=512 -max_len=65536 \
    -print_final_stats=1
done
