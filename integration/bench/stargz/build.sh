#!/bin/sh
# Build the stargz peer (main.go beside this script) into OUT, offline, from Debian's Go sources:
# golang-go, golang-github-containerd-stargz-snapshotter-dev (0.12) and the -dev packages it depends on,
# all under /usr/share/gocode.  GOPATH mode: Debian installs library sources, not modules.
#
#   integration/bench/stargz/build.sh OUT
set -eu
out=${1:?usage: build.sh OUT}
here=$(cd "$(dirname "$0")" && pwd)
src=/usr/share/gocode/src/github.com/containerd/stargz-snapshotter
command -v go >/dev/null || { echo "build.sh: no go compiler (apt-get install golang-go)" >&2; exit 2; }
[ -d "$src/snapshot" ] || { echo "build.sh: no stargz sources at $src" \
  "(apt-get install golang-github-containerd-stargz-snapshotter-dev)" >&2; exit 2; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export GO111MODULE=off GOFLAGS= GOPATH="$scratch:/usr/share/gocode"
export GOCACHE="${GOCACHE:-/var/cache/bootseer/go-build}"
go build -trimpath -o "$out.tmp" "$here/main.go"
mv "$out.tmp" "$out"
