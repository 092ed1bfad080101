#!/usr/bin/env bash
# build.sh: builds the release binaries and the images localhost/edgehub:VERSION and
# localhost/edgehub-controller:VERSION with podman (no registry, no Docker engine), and prints
# their sizes. Installs podman and runc with apt when they are missing (as root).
#   k8s/images/build.sh            # both images
#   SKIP_CARGO=1 k8s/images/build.sh   # images from the release binaries already built
set -euo pipefail
cd "$(dirname "$0")/../.."
here=k8s/images
export CONTAINERS_CONF=$PWD/$here/containers.conf

if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
  echo "== installing podman and runc"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman runc >/dev/null
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' k8s/Cargo.toml | head -1)
target=${CARGO_TARGET_DIR:-target}
if [ -z "${SKIP_CARGO:-}" ]; then
  echo "== cargo build --release (edgehub, edgehub-controller)"
  cargo build --release --locked -p hub -p k8s --bins
fi

for image in hub controller; do
  case $image in
    hub) bin=$target/release/edgehub tag=localhost/edgehub:$version ;;
    controller) bin=$target/release/edgehub-controller tag=localhost/edgehub-controller:$version ;;
  esac
  ctx=$target/images/$image
  "$here/stage.sh" "$bin" "$ctx"
  echo "== podman build $tag"
  podman build --isolation chroot -q -t "$tag" -f "$here/$image.Containerfile" "$ctx" >/dev/null
  size=$(podman image inspect --format '{{.Size}}' "$tag")
  echo "$tag $size bytes ($((size / 1024 / 1024)) MiB)"
done
