#!/bin/sh
# Give bcc kernel headers on hosts whose running kernel has no headers package.
#
# bcc compiles its programs against /lib/modules/$(uname -r)/build. CubeVS's tc
# programs use only uapi structures, so Debian's nearest cloud-amd64 headers
# (build) and their -common tree (source) are good enough for any recent kernel.
# Idempotent: existing real headers are left alone; our own links are refreshed.
set -eu

release="${1:-$(uname -r)}"
moddir="/lib/modules/$release"

if [ -e "$moddir/build/include/linux" ] && [ ! -L "$moddir/build" ]; then
    echo "kernel headers for $release already installed"
    exit 0
fi

# Newest installed Debian cloud headers, e.g. linux-headers-6.1.0-56-cloud-amd64.
build="$(ls -d /usr/src/linux-headers-*-cloud-amd64 2>/dev/null | sort -V | tail -n 1)"
if [ -z "$build" ]; then
    echo "no /usr/src/linux-headers-*-cloud-amd64: install linux-headers-cloud-amd64" >&2
    exit 1
fi
source="${build%-cloud-amd64}-common"
if [ ! -d "$source" ]; then
    echo "$source missing: install the matching linux-headers-*-common package" >&2
    exit 1
fi

mkdir -p "$moddir"
ln -sfn "$build" "$moddir/build"
ln -sfn "$source" "$moddir/source"
echo "linked $moddir/build -> $build and $moddir/source -> $source"
