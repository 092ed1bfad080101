#!/usr/bin/env bash
# Installs what the Helm chart's tests (k8s/chart/tests/) need, pinned, outside the repository:
#   ${EDGEHUB_CHART_VENV:-/var/tmp/edgehub-chart-venv}   Python venv with the pins of
#                                                         k8s/chart/tests/requirements.txt
# (helm-python-sdk: Helm v4's template engine as a library; kubernetes-validate: Kubernetes'
# own OpenAPI schemas; jsonschema; PyYAML). No helm binary and no cluster are needed.
#
# Idempotent and non-interactive; skipped when the venv's stamp (sha256 of the pin file +
# interpreter version) matches. `--force` reinstalls. Any failure names the command and exits
# non-zero.
set -Eeuo pipefail
trap 'rc=$?; echo "install-chart-tools: FAILED (exit $rc): $BASH_COMMAND" >&2; exit $rc' ERR

repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${EDGEHUB_CHART_VENV:-/var/tmp/edgehub-chart-venv}"
python="${EDGEHUB_PYTHON:-python3}"
req="$repo/k8s/chart/tests/requirements.txt"

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "install-chart-tools: unknown option $arg" >&2; exit 2 ;;
  esac
done

if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-chart-tools: need Debian package python3-venv and am not root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi

mkdir -p "$(dirname "$venv")"
# Two test runs may call this at once: one installs, the other waits and then finds the stamp.
exec 9>"$venv.lock"
flock 9

stamp="$(sha256sum "$req" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
if [ "$force" = 0 ] && [ -f "$venv/.edgehub-stamp" ] && [ "$(cat "$venv/.edgehub-stamp")" = "$stamp" ] \
   && "$venv/bin/python" -c 'import helm_python, kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  echo "install-chart-tools: $venv up to date (stamp matches)"
  exit 0
fi
echo "install-chart-tools: creating $venv with $("$python" --version) and the pins of k8s/chart/tests/requirements.txt"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
"$venv/bin/pip" check --disable-pip-version-check
"$venv/bin/python" -c 'import helm_python as h; print("install-chart-tools: helm", h.helm_sdk_version())'
echo "$stamp" >"$venv/.edgehub-stamp"
echo "install-chart-tools: ready: EDGEHUB_CHART_VENV=$venv"
