#!/usr/bin/env bash
# stage.sh BINARY DIR: lays out DIR as the build context of hub.Containerfile or
# controller.Containerfile: DIR/rootfs holds the binary (debug info stripped) at /NAME and
# exactly the shared libraries `ldd` lists for it, at their paths; DIR/data is an empty
# directory (the hub's data directory, owned by the image's user).
set -euo pipefail
bin=$1
out=$2
name=$(basename "$bin")
rm -rf "$out"
mkdir -p "$out/rootfs" "$out/data"
strip --strip-debug -o "$out/rootfs/$name" "$bin"
# Lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)";
# linux-vdso has no file.
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
  while read -r lib; do
    mkdir -p "$out/rootfs$(dirname "$lib")"
    cp -L "$lib" "$out/rootfs$lib"
  done
if ldd "$bin" | grep -q "not found"; then
  echo "stage.sh: $bin needs a library that is not installed:" >&2
  ldd "$bin" >&2
  exit 1
fi
