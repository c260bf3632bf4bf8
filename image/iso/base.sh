#!/usr/bin/env bash
# The ISO's base layer: Debian 12 + packages.txt as a live-bootable root tree.
#   base.sh ROOT_DIR
# This file and packages.txt are the base layer's cache key (see build.sh): any
# change here rebuilds it (minutes, network), a change elsewhere does not.
set -euo pipefail
root="$1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mirror="http://deb.debian.org/debian"
packages="$(grep -v '^#' "$here/packages.txt" | grep -v '^$' | paste -sd, -)"

# Run by mmdebstrap inside the new root ($1) once the packages are installed.
hooks=(
  'echo cube > "$1/etc/hostname"'
  'printf "127.0.0.1 localhost\n127.0.1.1 cube\n::1 localhost\n" > "$1/etc/hosts"'
  # DHCP on every wired interface; no other network configuration on the appliance.
  'mkdir -p "$1/etc/systemd/network" && printf "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n" > "$1/etc/systemd/network/80-dhcp.network"'
  'chroot "$1" systemctl enable systemd-networkd.service'
  # The console screen (cube-console) replaces the login prompt on tty1; root has no password.
  'chroot "$1" passwd -l root'
  # live-boot's initramfs scripts must be in the initrd the ISO boots.
  'chroot "$1" update-initramfs -u -k all'
  'rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/etc/machine-id "$1"/var/lib/dbus/machine-id'
  'touch "$1/etc/machine-id"'
)

args=(
  --variant=minbase --mode=root --format=directory
  "--aptopt=APT::Install-Recommends \"false\""
  --dpkgopt=path-exclude=/usr/share/doc/* --dpkgopt=path-include=/usr/share/doc/*/copyright
  --dpkgopt=path-exclude=/usr/share/man/* --dpkgopt=path-exclude=/usr/share/locale/*
  --include="$packages"
  --setup-hook='mkdir -p "$1/etc/apt/sources.list.d"'
)
for hook in "${hooks[@]}"; do args+=("--customize-hook=$hook"); done
exec nice -n 10 mmdebstrap "${args[@]}" bookworm "$root" \
  "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
  "deb http://deb.debian.org/debian-security bookworm-security main"
