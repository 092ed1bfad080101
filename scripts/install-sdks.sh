#!/usr/bin/env bash
# Installs the official Azure IoT SDKs that edgehub's SDK tests drive as real modules
# (tests/sdk/), pinned, outside the repository:
#   ${EDGEHUB_SDK_DIR:-/var/tmp/edgehub-sdk}/venv               Python azure-iot-device 2.14.0
#   ${EDGEHUB_SDK_DIR:-/var/tmp/edgehub-sdk}/node/node_modules  Node azure-iot-device 1.18.4,
#                                                               -mqtt 1.16.4, -amqp 1.14.4
# plus the Debian packages the harness needs (ip, unshare, flock, python3-venv, node/npm).
#
# Idempotent and non-interactive; meant for a fresh Debian machine as root. Each part is
# skipped when its stamp (sha256 of the committed pin file + interpreter version) matches, so a
# second run costs a second. Any failure names the command that failed and exits non-zero.
#
# Options:
#   --force      reinstall both parts even when the stamps match
#   --refreeze   rebuild tests/sdk/python/requirements.txt from a fresh unpinned install of
#                azure-iot-device==2.14.0 and tests/sdk/node/package-lock.json from
#                package.json (then commit them); implies --force
set -Eeuo pipefail
trap 'rc=$?; echo "install-sdks: FAILED (exit $rc): $BASH_COMMAND" >&2; exit $rc' ERR

repo="$(cd "$(dirname "$0")/.." && pwd)"
sdk_dir="${EDGEHUB_SDK_DIR:-/var/tmp/edgehub-sdk}"
python="${EDGEHUB_PYTHON:-python3}"
req="$repo/tests/sdk/python/requirements.txt"
pkg="$repo/tests/sdk/node/package.json"
lock="$repo/tests/sdk/node/package-lock.json"
py_sdk_version="2.14.0"

force=0 refreeze=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --refreeze) refreeze=1 force=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "install-sdks: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { echo "install-sdks: $*"; }
run() { echo "+ $*"; "$@"; }

# --- Debian packages ------------------------------------------------------------------------
need_apt=()
command -v ip >/dev/null || need_apt+=(iproute2)
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v flock >/dev/null || need_apt+=(util-linux)
if ! command -v "$python" >/dev/null; then
  if [ "$python" != python3 ]; then echo "install-sdks: EDGEHUB_PYTHON=$python not found" >&2; exit 1; fi
  need_apt+=(python3)
fi
if command -v "$python" >/dev/null && ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  need_apt+=(python3-venv)
fi
# This machine's nodejs (a NodeSource build) carries its own npm; Debian's npm package would
# conflict with it, so npm is only asked for when it is really missing.
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  mapfile -t need_apt < <(printf '%s\n' "${need_apt[@]}" | sort -u)
  if [ "$(id -u)" != 0 ]; then
    echo "install-sdks: need Debian packages ${need_apt[*]} and am not root" >&2
    exit 1
  fi
  say "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  run apt-get update -qq
  run apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
else
  say "Debian packages present (ip, unshare, flock, $python with venv, node, npm)"
fi

node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 14 ]; then
  echo "install-sdks: node $(node --version) is too old for azure-iot-device 1.18 (need >= 14)" >&2
  exit 1
fi

mkdir -p "$sdk_dir"
# Two test runs may call this at once: one installs, the other waits and then finds the stamps.
exec 9>"$sdk_dir/.install.lock"
flock 9

# --- refreeze (maintainers only) ------------------------------------------------------------
if [ "$refreeze" = 1 ]; then
  tmp="$(mktemp -d)"
  say "refreezing $req from a fresh install of azure-iot-device==$py_sdk_version"
  run "$python" -m venv "$tmp/venv"
  run "$tmp/venv/bin/pip" install -q --disable-pip-version-check "azure-iot-device==$py_sdk_version"
  {
    echo "# Pinned: azure-iot-device $py_sdk_version and what it pulled in (pip freeze in a fresh venv, Python $("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'))."
    echo "# Regenerate: scripts/install-sdks.sh --refreeze (then commit this file)."
    "$tmp/venv/bin/pip" freeze --disable-pip-version-check
  } >"$req"
  say "refreezing $lock from $pkg"
  cp "$pkg" "$tmp/package.json"
  run npm install --prefix "$tmp" --package-lock-only --no-audit --no-fund
  cp "$tmp/package-lock.json" "$lock"
  rm -rf "$tmp"
fi

# --- Python venv ----------------------------------------------------------------------------
venv="$sdk_dir/venv"
py_stamp="$(sha256sum "$req" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
if [ "$force" = 0 ] && [ -f "$venv/.edgehub-stamp" ] && [ "$(cat "$venv/.edgehub-stamp")" = "$py_stamp" ] \
   && "$venv/bin/python" -c 'import azure.iot.device' 2>/dev/null; then
  say "Python SDK up to date in $venv (stamp matches)"
else
  say "creating $venv with $("$python" --version) and the pins of tests/sdk/python/requirements.txt"
  run rm -rf "$venv"
  run "$python" -m venv "$venv"
  run "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  run "$venv/bin/pip" check --disable-pip-version-check
  got="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("azure-iot-device"))')"
  if [ "$got" != "$py_sdk_version" ]; then
    echo "install-sdks: venv has azure-iot-device $got, want $py_sdk_version" >&2
    exit 1
  fi
  echo "$py_stamp" >"$venv/.edgehub-stamp"
fi

# --- Node packages --------------------------------------------------------------------------
node_dir="$sdk_dir/node"
node_stamp="$(cat "$pkg" "$lock" | sha256sum | cut -d' ' -f1) node$node_major"
if [ "$force" = 0 ] && [ -f "$node_dir/.edgehub-stamp" ] && [ "$(cat "$node_dir/.edgehub-stamp")" = "$node_stamp" ] \
   && [ -d "$node_dir/node_modules/azure-iot-device-mqtt" ]; then
  say "Node SDK up to date in $node_dir/node_modules (stamp matches)"
else
  say "installing the Node SDK into $node_dir/node_modules from tests/sdk/node/package-lock.json"
  mkdir -p "$node_dir"
  rm -f "$node_dir/.edgehub-stamp"
  cp "$pkg" "$lock" "$node_dir/"
  run npm ci --prefix "$node_dir" --no-audit --no-fund --loglevel=error
  echo "+ checking installed versions"
  (cd "$node_dir" && node -e '
    const want = {"azure-iot-device": "1.18.4", "azure-iot-device-mqtt": "1.16.4", "azure-iot-device-amqp": "1.14.4"};
    for (const [name, v] of Object.entries(want)) {
      const got = require(name + "/package.json").version;
      if (got !== v) { console.error(`install-sdks: ${name} is ${got}, want ${v}`); process.exit(1); }
    }')
  echo "$node_stamp" >"$node_dir/.edgehub-stamp"
fi

say "ready: EDGEHUB_SDK_DIR=$sdk_dir"
say "  python: $venv/bin/python ($("$venv/bin/python" -c 'import importlib.metadata as m; print("azure-iot-device", m.version("azure-iot-device"), "paho-mqtt", m.version("paho-mqtt"))'))"
say "  node:   $(command -v node) $(node --version), NODE_PATH=$node_dir/node_modules"
