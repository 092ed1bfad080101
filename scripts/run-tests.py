#!/usr/bin/env python3
"""Builds the workspace's tests, then runs the test binaries JOBS at a time.

    scripts/run-tests.py [--jobs N] [--timeout SECONDS]

What `cargo test --workspace --locked --no-fail-fast` does, except that `cargo test` runs one
binary after another. Most of our slow binaries wait on other processes (SDK modules, podman,
a hub being killed and restarted), so two at a time finish the suite sooner on CI's two cores.
Each binary runs as cargo would run it (working directory its package's, CARGO_MANIFEST_DIR
and CARGO_PKG_NAME set); its output is printed whole when it ends, so logs do not interleave.
Every binary runs even after a failure; the script exits 1 if any failed and names them.
Binaries known to be slow start first (longest first packs two lanes best). A binary still
running after --timeout seconds (default 1200) is killed and counts as failed. Doc tests run
afterwards with `cargo test --doc`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# Slowest first (seconds in a run on CI's machine, 2026-12-07; order only, not a limit).
SLOW_FIRST = [
    "sdk_replicas",
    "sdk_amqp",
    "scenarios",
    "kube_play",
    "sdk_reload",
    "init_race",
    "upstream_methods",
    "mqtt_reliability",
    "sdk_restart",
    "kill9",
    "sdk_python",
    "sdk_limits",
    "podman_hub",
    "crash_points",
    "sdk_security",
    "mqtt_protocol",
    "sdk_twins",
]


def test_binaries():
    """(name, executable, package dir, package name) of every test binary, built now."""
    cmd = ["cargo", "test", "--workspace", "--locked", "--no-run",
           "--message-format=json-render-diagnostics"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"run-tests: `{' '.join(cmd)}` failed ({proc.returncode})")
    found = []
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact" or not msg.get("profile", {}).get("test"):
            continue
        exe = msg.get("executable")
        if not exe:
            continue
        target = msg["target"]
        name = target["name"] if "test" in target["kind"] else f"{target['name']} (unit)"
        pkg_dir = os.path.dirname(msg["manifest_path"])
        pkg = msg["package_id"]
        found.append((name, exe, pkg_dir, package_name(pkg, pkg_dir)))
    return found


def package_name(package_id, pkg_dir):
    # package_id: "path+file:///dir#name@version" or "path+file:///dir#version" (name = dir).
    frag = package_id.rsplit("#", 1)[-1]
    if "@" in frag:
        return frag.split("@", 1)[0]
    return os.path.basename(pkg_dir)


def order(binaries):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    return sorted(binaries, key=lambda b: (rank.get(b[0], len(SLOW_FIRST)), b[0]))


print_lock = threading.Lock()


def run_one(binary, timeout):
    name, exe, pkg_dir, pkg = binary
    env = dict(os.environ, CARGO_MANIFEST_DIR=pkg_dir, CARGO_PKG_NAME=pkg)
    started = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as out:
        with print_lock:
            print(f"     Running {name} ({exe})", flush=True)
        proc = subprocess.Popen([exe], cwd=pkg_dir, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            code = proc.wait(timeout=timeout)
            note = ""
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -1
            note = f" (killed after {timeout} s)"
        took = time.monotonic() - started
        out.seek(0)
        text = out.read()
    with print_lock:
        print(f"==== {pkg} {name}: exit {code}{note} in {took:.0f} s", flush=True)
        sys.stdout.write(text)
        sys.stdout.flush()
    return name, code, took


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=int(os.environ.get("EDGEHUB_TEST_JOBS", "2")))
    p.add_argument("--timeout", type=int, default=1200)
    args = p.parse_args()
    binaries = order(test_binaries())
    print(f"run-tests: {len(binaries)} test binaries, {args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda b: run_one(b, args.timeout), binaries))
    doc = subprocess.run(["cargo", "test", "--workspace", "--locked", "--doc"])
    failed = [name for name, code, _ in results if code != 0]
    if doc.returncode != 0:
        failed.append("doc tests")
    print("run-tests: slowest:", ", ".join(
        f"{n} {t:.0f} s" for n, _, t in sorted(results, key=lambda r: -r[2])[:8]))
    if failed:
        print(f"run-tests: FAILED: {', '.join(failed)}", flush=True)
        sys.exit(1)
    print(f"run-tests: all {len(results)} test binaries and the doc tests passed")


if __name__ == "__main__":
    main()
