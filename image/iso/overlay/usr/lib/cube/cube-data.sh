#!/bin/sh
# First boot of the appliance ISO: find the CUBE-DATA partition, or create it on the
# first empty disk, and mount it as the state directory (/var/lib/cube), so the
# store, API keys, CA, templates and sandboxes survive a reboot. Then mount the
# templates shipped on the boot medium read-only into it.
set -eu
STATE=/var/lib/cube
MEDIUM=/run/live/medium
SEED=/sys/firmware/qemu_fw_cfg/by_name/opt/cube/appliance.toml/raw

say() { echo "cube-data: $*"; }

# A whole disk with no partition table, no filesystem and no other signature.
first_empty_disk() {
  lsblk -dnpo NAME,TYPE,RO | while read -r name type ro; do
    [ "$type" = disk ] && [ "$ro" = 0 ] || continue
    [ "$(lsblk -nro NAME "$name" | wc -l)" = 1 ] || continue
    [ -z "$(blkid -p -o value -s TYPE "$name" 2>/dev/null)" ] || continue
    [ -z "$(blkid -p -o value -s PTTYPE "$name" 2>/dev/null)" ] || continue
    echo "$name"
    return 0
  done
}

udevadm settle || true
dev="$(blkid -L CUBE-DATA 2>/dev/null || true)"
if grep -qw cube.nodata /proc/cmdline; then
  say "cube.nodata on the kernel command line: state is kept in RAM and lost at reboot"
  dev=""
elif [ -z "$dev" ]; then
  disk="$(first_empty_disk)"
  if [ -z "$disk" ]; then
    say "no CUBE-DATA partition and no empty disk: state is kept in RAM and lost at reboot"
  else
    say "creating CUBE-DATA on $disk"
    printf 'label: gpt\ntype=linux, name=CUBE-DATA\n' | sfdisk --quiet --wipe always "$disk"
    udevadm settle || true
    part="$(lsblk -nrpo NAME,TYPE "$disk" | awk '$2 == "part" {print $1; exit}')"
    mkfs.ext4 -q -L CUBE-DATA "$part"
    dev="$part"
  fi
fi

mkdir -p "$STATE"
if [ -n "$dev" ]; then
  say "mounting $dev on $STATE"
  mount -o noatime "$dev" "$STATE"
fi
chmod 700 "$STATE"

# The configuration lives with the data (/etc/cube/appliance.toml links here).
# A VM may seed it on first boot through qemu's fw_cfg (opt/cube/appliance.toml).
if [ ! -s "$STATE/appliance.toml" ]; then
  modprobe qemu_fw_cfg 2>/dev/null || true
  if [ -r "$SEED" ]; then
    say "configuration seeded from fw_cfg"
    cp "$SEED" "$STATE/appliance.toml.new"
  else
    cp /usr/lib/cube/appliance.toml "$STATE/appliance.toml.new"
  fi
  mv "$STATE/appliance.toml.new" "$STATE/appliance.toml"
fi

# Templates shipped on the medium: one squashfs each, mounted over an (empty)
# directory of the state's template store. Sandboxes only read them: each gets its
# own copy-on-write layer in $STATE/sandboxes.
mkdir -p "$STATE/templates"
for image in "$MEDIUM"/cube/templates/*.squashfs; do
  [ -e "$image" ] || continue
  name="$(basename "$image" .squashfs)"
  target="$STATE/templates/$name"
  mountpoint -q "$target" && continue
  mkdir -p "$target"
  mount -t squashfs -o ro,loop "$image" "$target"
  say "template $name from the boot medium"
done
