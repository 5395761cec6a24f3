#!/usr/bin/env bash
# One installer for every place BootSeer runs: .ci/run, the README quickstart and the Dockerfile.
# Idempotent: a second run installs nothing new. Needs root and the Debian/PyPI registries only.
#
#   integration/install.sh            system packages + the Python package (editable, with test extras)
#   integration/install.sh --system   system packages only (the Dockerfile's first layer)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mode=${1:-all}

SYSTEM_PACKAGES=(
  containerd runc                       # the container runtime BootSeer plugs into
  docker-registry                       # distribution 2.8: the local registry
  erofs-utils                           # mkfs.erofs / dump.erofs for lazy layer blobs
  fuse3 libfuse3-dev pkg-config         # pyfuse3 builds against libfuse3
  skopeo umoci                          # OCI image tooling for test images
  debootstrap mmdebstrap                # realistic Debian rootfs for the benchmark image
  busybox-static                        # the small test image's userland
  docker.io                             # depsnap's Docker-engine path (tests start their own dockerd)
  golang-github-containerd-containerd-dev  # containerd's .proto files (stub regeneration check)
  iproute2 util-linux kmod procps psmisc  # netns/veth/tc, losetup, modprobe, ps/fuser
  attr xz-utils zstd ca-certificates
  e2fsprogs                             # filefrag (FIEMAP): lazy-pull tests find which chunk holds a file
  nginx-light                           # ckptfs benchmark: per-connection rate-limited stripe server
  stargz-snapshotter golang-go golang-github-containerd-stargz-snapshotter-dev  # start-up benchmark's peer
)
# BOOTSEER_PACKAGES=daemon (the Dockerfile): only what the snapshotter and the sidecar run with
if [ "${BOOTSEER_PACKAGES:-all}" = daemon ]; then
  SYSTEM_PACKAGES=(erofs-utils fuse3 libfuse3-dev pkg-config util-linux mount kmod procps ca-certificates)
fi

missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The distro's units must not grab the default sockets: the local stack runs its own instances.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now containerd docker-registry docker docker.socket >/dev/null 2>&1 || true
fi
for m in fuse overlay erofs loop; do modprobe "$m" 2>/dev/null || true; done

[ "$mode" = "--system" ] && exit 0

# Python: the machine's own interpreter if pip may install into it (CI, developer machines), else a venv
# (Debian's python3 is "externally managed": the Dockerfile path), linked onto PATH.
py=${PYTHON:-python3}
command -v "$py" >/dev/null || { apt-get update -qq; apt-get install -y -qq --no-install-recommends python3; }
if [ -z "${PYTHON:-}" ] && "$py" -c 'import sys, sysconfig, pathlib; sys.exit(not pathlib.Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists())' 2>/dev/null; then
  venv_deps=(python3-venv python3-dev gcc)
  for p in "${venv_deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || { apt-get update -qq; apt-get install -y -qq --no-install-recommends "${venv_deps[@]}"; break; }
  done
  [ -x /opt/bootseer/venv/bin/python ] || python3 -m venv /opt/bootseer/venv
  py=/opt/bootseer/venv/bin/python
fi
extras=${BOOTSEER_EXTRAS-dev}  # the Dockerfile sets it empty: no test tools in the daemon image
PIP_ROOT_USER_ACTION=ignore "$py" -m pip install -q --disable-pip-version-check -e "$here${extras:+[$extras]}"
# An editable install is not byte-compiled (pip compiles a regular install's modules): without this every
# command run where bytecode is not written (PYTHONDONTWRITEBYTECODE, a read-only tree) recompiles the
# modules it imports — ~40 ms of each `bootseer pull`, on the way to a container's start.
"$py" -m compileall -q -j 0 "$here"/bootseer "$here"/snapshotter "$here"/recorder "$here"/registry_sidecar \
  "$here"/depsnap "$here"/ckptfs "$here"/protos "$here"/integration >/dev/null
bin=$(dirname "$("$py" -c 'import sys; print(sys.executable)')")
[ -x /usr/local/bin/bootseer ] || [ "$bin" = /usr/local/bin ] || ln -sf "$bin/bootseer" /usr/local/bin/bootseer
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
"$py" -c 'import bootseer, pyfuse3, grpc' || { echo "install.sh: the Python package did not install" >&2; exit 1; }
