#!/usr/bin/env bash
# Syscall-level evidence for dependencies.md §3.6 (1): does an acknowledged
# append reach the disk with fsync/fdatasync before it is acknowledged?
#
# A kill -9 loop cannot tell (the page cache survives a process crash), so
# this runs each probe under
#   strace -f -y -e trace=fsync,fdatasync,sync_file_range,pwrite64,pwritev,write
# and, for every acknowledged append (bracketed by "edgehub-probe begin i" /
# "edgehub-probe end i" markers the probe writes to stderr), checks whether an
# fsync or fdatasync of a data file was entered after the data was written
# and returned before the acknowledgement.
#
# Probes: sled 0.34.7 with its default config (background flusher every
# 500 ms), sled with the background flusher off (flush() alone), and our
# store (append(..).wait()) when it builds.
#
# Usage: benches/sled-evidence.sh [N]          (N appends per probe, default 2000)
#        benches/sled-evidence.sh [N] --save   (also write benches/results/sled-strace.txt)
# Needs strace (apt-get install -y strace) and python3.
set -euo pipefail

N="${1:-2000}"
SAVE="${2:-}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"   # logical path, not resolved
MANIFEST="$REPO/Cargo.toml"

if ! command -v strace >/dev/null; then
  echo "strace is missing: apt-get install -y strace" >&2
  exit 1
fi

cargo build --quiet --release --manifest-path "$MANIFEST" -p benches --bin sled_flush_probe >&2
STORE_BUILT=yes
if ! cargo build --quiet --release --manifest-path "$MANIFEST" -p benches --bin store_append_probe >&2; then
  STORE_BUILT=no
fi
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps --manifest-path "$MANIFEST" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
BIN="$TARGET_DIR/release"

PARENT="${EDGEHUB_BENCH_DIR:-$TARGET_DIR/bench-tmp}"
mkdir -p "$PARENT"
WORK="$(mktemp -d "$PARENT/sled-evidence-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

run_probe() { # name, data dir, command...
  local name="$1" data="$2"
  shift 2
  strace -f -y -s 48 -e trace=fsync,fdatasync,sync_file_range,pwrite64,pwritev,write \
    -o "$WORK/$name.strace" "$@" 2>/dev/null
  python3 - "$WORK/$name.strace" "$data" "$name" <<'PY'
import re, sys
from collections import Counter

trace, data_dir, name = sys.argv[1], sys.argv[2].rstrip("/") + "/", sys.argv[3]
SYNCS = {"fsync", "fdatasync"}
WRITES = {"pwrite64", "pwritev", "write"}
call_re = re.compile(r"^(\d+)\s+(\w+)\((\d+)<([^>]*)>(.*)$")
resumed_re = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
marker_re = re.compile(r'"edgehub-probe (\w+)(?: (\d+))?\\n"')

# events: (kind, name, path, tid, entry_line, exit_line); markers: (what, i, line)
events, markers, pending, lines = [], [], {}, []
with open(trace) as f:
    for no, line in enumerate(f):
        line = line.rstrip("\n")
        lines.append(line)
        m = call_re.match(line)
        if m:
            tid, call, _fd, path, rest = m.groups()
            mk = marker_re.search(rest) if call == "write" else None
            if mk:
                markers.append((mk.group(1), mk.group(2), no))
                continue
            if not path.startswith(data_dir):
                continue
            if "<unfinished ...>" in rest:
                pending[(tid, call)] = (path, no)
            else:
                events.append((call, path, tid, no, no))
            continue
        m = resumed_re.match(line)
        if m:
            tid, call, _ = m.groups()
            if (tid, call) in pending:
                path, entry = pending.pop((tid, call))
                events.append((call, path, tid, entry, no))

def pos(what, default):
    return next((l for w, _, l in markers if w == what), default)

opened, done = pos("opened", 0), pos("done", len(lines))
begins = {int(i): l for w, i, l in markers if w == "begin"}
ends = {int(i): l for w, i, l in markers if w == "end"}
acks = sorted(i for i in begins if i in ends)
main_tid = next((lines[l].split()[0] for _, _, l in markers), None)

def short(path):
    return path[len(data_dir):]

counts = Counter((c, short(p)) for c, p, _, en, ex in events if opened < ex < done)
durable, with_sfr, with_write, sync_tids, early = 0, 0, 0, Counter(), 0
example = None
for i in acks:
    b, e = begins[i], ends[i]
    inside = [ev for ev in events if b < ev[4] < e]
    writes = [ev for ev in inside if ev[0] in WRITES]
    if writes:
        with_write += 1
    if any(ev[0] == "sync_file_range" for ev in inside):
        with_sfr += 1
    first_write = min((ev[4] for ev in writes), default=None)
    syncs = [ev for ev in inside if ev[0] in SYNCS and first_write is not None and ev[3] > first_write]
    early += sum(1 for ev in inside if ev[0] in SYNCS and ev not in syncs)
    if syncs:
        durable += 1
        sync_tids.update("the calling thread" if ev[2] == main_tid else "another thread" for ev in syncs)
    if example is None and i >= min(10, len(acks) - 1):
        example = (i, b, e)

print(f"== {name} ==")
print(f"acknowledged appends: {len(acks)}")
print("syscalls on the data files between open and the last ack:")
for (call, path), n in sorted(counts.items()):
    print(f"  {call:<16} {n:>6}  {path}")
if not counts:
    print("  (none)")
print("per acknowledged append (between its begin and end markers):")
print(f"  data written (pwrite64/pwritev/write):                 {with_write}/{len(acks)}")
print(f"  sync_file_range on a data file:                        {with_sfr}/{len(acks)}")
print(f"  fsync/fdatasync of a data file, after the write, before the ack: {durable}/{len(acks)}"
      + (" (" + ", ".join(f"{n} by {who}" for who, n in sync_tids.items()) + ")" if sync_tids else ""))
in_window = lambda ex: any(begins[i] < ex < ends[i] for i in acks)
outside = [ev for ev in events if ev[0] in SYNCS and opened < ev[4] < done and not in_window(ev[4])]
if early:
    print(f"  fsync/fdatasync of a data file inside an ack window but entered before that "
          f"append's write (not guaranteed to cover it): {early}")
if outside:
    tids = sorted({ev[2] for ev in outside})
    print(f"  fsync/fdatasync of a data file outside every ack window: {len(outside)} "
          f"(threads {', '.join(tids)}; the caller is {main_tid})")
if acks and durable == len(acks):
    print("  verdict: PASS - every acknowledgement waited for fsync/fdatasync of its data")
elif acks:
    print(f"  verdict: FAIL - {len(acks) - durable} of {len(acks)} acknowledgements returned "
          "without an fsync/fdatasync of the data written for them")
if example:
    i, b, e = example
    print(f"excerpt (append #{i}, data dir shortened to <dir>/):")
    for line in lines[b:e + 1][:12]:
        line = line.replace(data_dir, "<dir>/")
        print("  " + (line if len(line) <= 150 else line[:147] + "..."))
print()
PY
}

{
  echo "# Syscall evidence: is an acknowledged append fsync'ed/fdatasync'ed before the ack?"
  echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $N appends per probe, one appender thread"
  echo "# sled 0.34.7 (Cargo.lock: $(grep -A1 '^name = "sled"' "$REPO/Cargo.lock" 2>/dev/null | sed -n 's/version = //p' | tr -d '"'))," \
    "kernel $(uname -r), fs $(findmnt -n -o FSTYPE -T "$WORK" 2>/dev/null || stat -f -c %T "$WORK") under $PARENT, $(strace -V | head -1)"
  echo "# strace -f -y -e trace=fsync,fdatasync,sync_file_range,pwrite64,pwritev,write <probe>"
  echo "# produced by benches/sled-evidence.sh; see dependencies.md §3.6 (1)"
  echo
  run_probe "sled 0.34.7, default config (background flusher every 500 ms)" "$WORK/sled-default" \
    "$BIN/sled_flush_probe" "$WORK/sled-default" "$N"
  run_probe "sled 0.34.7, background flusher off (flush() alone)" "$WORK/sled-noflusher" \
    "$BIN/sled_flush_probe" "$WORK/sled-noflusher" "$N" --flush-every-ms off
  if [ "$STORE_BUILT" = yes ]; then
    run_probe "edgehub store, append(..).wait()" "$WORK/store" \
      "$BIN/store_append_probe" "$WORK/store" "$N"
  else
    echo "== edgehub store =="
    echo "not measured: store_append_probe does not build yet"
    echo
  fi
  echo "Reading: sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER) starts and waits for writeback of"
  echo "the range but, per its man page, flushes neither the disk's write cache nor metadata"
  echo "(e.g. the file size after an append): an ack after it survives kill -9 (page cache)"
  echo "but not power or node loss. fsync/fdatasync after the write and before the ack does."
} | if [ "$SAVE" = "--save" ]; then tee "$REPO/benches/results/sled-strace.txt"; else cat; fi
