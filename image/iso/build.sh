#!/usr/bin/env bash
# Build the appliance ISO (hybrid BIOS + UEFI, live boot).
#   build.sh OUTPUT.iso
# Environment: CUBE_ISO_CACHE (default /var/cache/cube/iso), CUBE_CACHE_DIR (UML kernels,
# default /var/cache/cube), CUBE_TEMPLATES_DIR (default /var/lib/cube/templates),
# CUBE_ISO_TEMPLATE (default code-interpreter), CUBE_PYTHON (builds the wheel).
#
# Layers, cheapest last; each expensive one is cached under $CUBE_ISO_CACHE by a
# hash of its inputs:
#   base-<hash>/       Debian 12 + packages.txt (base.sh), kernel, initrd, squashfs
#   template-<hash>.squashfs   the default template, keyed by its manifest and image
#   app.squashfs       /opt/cube/venv from a wheel of this checkout, the UML kernel, the
#                      kvm runtime's microVM kernel (built here if missing: image/kernel,
#                      cached by its inputs), systemd units and first-boot scripts
#                      (overlay/): every build
set -euo pipefail

output="$(realpath -m "$1")"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$(cd "$here/../.." && pwd)"
cache="${CUBE_ISO_CACHE:-/var/cache/cube/iso}"
kernels="${CUBE_CACHE_DIR:-/var/cache/cube}/kernels"
templates="${CUBE_TEMPLATES_DIR:-/var/lib/cube/templates}"
template="${CUBE_ISO_TEMPLATE:-code-interpreter}"
python="${CUBE_PYTHON:-python3}"
steps=5
step=0
started=$SECONDS

progress() { step=$((step + 1)); printf '[%d/%d] %s (%ds)\n' "$step" "$steps" "$*" "$((SECONDS - started))"; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
# Remove cache entries of one kind except the current one (keeps disk use bounded).
prune() { local keep="$1"; shift; for old in "$@"; do [ "$old" = "$keep" ] || rm -rf "$old"; done; }

[ "$(id -u)" = 0 ] || { echo "build-iso: run as root (mmdebstrap, mounts)" >&2; exit 1; }
for tool in mmdebstrap mksquashfs grub-mkrescue xorriso mformat; do
  command -v "$tool" >/dev/null || {
    echo "build-iso: $tool missing: apt-get install mmdebstrap squashfs-tools grub-pc-bin grub-efi-amd64-bin grub-common xorriso mtools" >&2
    exit 1; }
done
mkdir -p "$cache"
work="$(mktemp -d "$cache/work.XXXXXX")"
mounts=()
cleanup() {
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# 1. Base layer.
base_key="$(hash_of "$here/packages.txt" "$here/base.sh")"
base="$cache/base-$base_key"
if [ -f "$base/filesystem.squashfs" ]; then
  progress "Debian base layer: cached ($base)"
else
  progress "Debian base layer: mmdebstrap + mksquashfs (minutes)"
  rm -rf "$base.partial"
  mkdir -p "$base.partial"
  bash "$here/base.sh" "$base.partial/root" > "$base.partial/mmdebstrap.log" 2>&1 || {
    tail -30 "$base.partial/mmdebstrap.log" >&2; exit 1; }
  cp "$(ls "$base.partial"/root/boot/vmlinuz-* | sort -V | tail -1)" "$base.partial/vmlinuz"
  cp "$(ls "$base.partial"/root/boot/initrd.img-* | sort -V | tail -1)" "$base.partial/initrd.img"
  nice -n 10 mksquashfs "$base.partial/root" "$base.partial/filesystem.squashfs" \
    -comp zstd -Xcompression-level 6 -noappend -quiet -no-progress -e boot
  prune "$base.partial" "$cache"/base-*
  mv "$base.partial" "$base"
fi

# 2. Template layer (read from the template store, never written).
tdir="$templates/$template"
[ -f "$tdir/template.json" ] && [ -f "$tdir/rootfs.ext4" ] || {
  echo "build-iso: no template $tdir: run \`cube tpl build-default\` first" >&2; exit 1; }
template_key="$( (cat "$tdir/template.json"; stat -c '%s %Y' "$tdir/rootfs.ext4") | sha256sum | cut -c1-16)"
template_image="$cache/template-$template-$template_key.squashfs"
if [ -f "$template_image" ]; then
  progress "template $template: cached ($template_image)"
else
  progress "template $template: mksquashfs of $(du -sh "$tdir" | cut -f1) (a few minutes)"
  # lz4: the live system decompresses it on every sandbox read; the size matters less.
  nice -n 10 mksquashfs "$tdir" "$template_image.partial" -comp lz4 -noappend -quiet -no-progress -no-xattrs
  prune "$template_image.partial" "$cache"/template-"$template"-*.squashfs
  mv "$template_image.partial" "$template_image"
fi

# 3. App layer: venv from a wheel of this checkout, on top of the base via overlayfs.
progress "app layer: wheel, venv, UML and microVM kernels, units"
kernel="$(ls -t "$kernels"/uml-*/linux 2>/dev/null | head -1 || true)"
[ -n "$kernel" ] || { echo "build-iso: no UML kernel in $kernels: run \`cube image build-uml-kernel\`" >&2; exit 1; }
# The kvm runtime's guest kernel (servers with VMX/SVM boot sandboxes with it): built here
# when this checkout's microvm.config has not been built yet (cached by its inputs).
guest_kernel="$(nice -n 10 "$python" "$src/image/kernel/build.py" --cache-dir "$(dirname "$kernels")" | tail -1)"
[ -f "$guest_kernel" ] || { echo "build-iso: the microVM guest kernel build failed" >&2; exit 1; }
mkdir -p "$work/wheels" "$work/upper" "$work/ovl" "$work/merged"
# From a copy: a wheel build writes build/ and egg-info into its source tree.
mkdir -p "$work/src"
cp -r "$src/appliance" "$src/cffi_kvm" "$src/pyproject.toml" "$src/setup.py" "$src/README.md" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$python" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheels" "$work/src" > "$work/wheel.log" 2>&1 || {
  cat "$work/wheel.log" >&2; exit 1; }
# With the bench extra (the E2B SDKs): `cube bench` works in the appliance as after the installer.
"$python" -m pip download -q -d "$work/wheels" --only-binary=:all: "$(ls "$work"/wheels/cube_appliance-*.whl)[bench]" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
mount -t overlay overlay -o "lowerdir=$base/root,upperdir=$work/upper,workdir=$work/ovl" "$work/merged"
mounts+=("$work/merged")
for fs in proc sys dev; do mount --bind "/$fs" "$work/merged/$fs"; mounts+=("$work/merged/$fs"); done
mkdir -p "$work/merged/tmp/wheels" && cp "$work"/wheels/*.whl "$work/merged/tmp/wheels/"
# A clean environment: the host's PIP_* settings name paths that are not in the chroot.
in_root() { chroot "$work/merged" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }
in_root python3 -m venv --system-site-packages /opt/cube/venv
in_root /opt/cube/venv/bin/pip install -q --no-index --find-links /tmp/wheels 'cube-appliance[bench]'
in_root /opt/cube/venv/bin/python -c 'import e2b_code_interpreter'
in_root /opt/cube/venv/bin/python -c 'import appliance.cli, bcc'
for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount "${mounts[i]}"; done
mounts=()
app="$work/upper"
rm -rf "$app/tmp" "$app/root/.cache" "$app/var/cache/ldconfig"
mkdir -p "$app/opt/cube/image" "$app/usr/local/bin"
# With their .config: the uml runtime reads it to know the kernel has the balloon driver (uml/balloon.py).
for built in "$kernel" "$guest_kernel"; do
  mkdir -p "$app/var/cache/cube/kernels/$(basename "$(dirname "$built")")"
  cp "$built" "$(dirname "$built")/config" "$app/var/cache/cube/kernels/$(basename "$(dirname "$built")")/"
done
cp -r "$src/image/rootfs" "$src/image/uml" "$app/opt/cube/image/"
ln -sfn /opt/cube/venv/bin/cube "$app/usr/local/bin/cube"
cp -a "$here/overlay/." "$app/"
install -D -m 644 "$src/systemd/cube.service" "$app/etc/systemd/system/cube.service"
wants="$app/etc/systemd/system/multi-user.target.wants"
mkdir -p "$wants"
for unit in cube.service cube-data.service cube-cluster.service cube-console.service; do ln -sfn "/etc/systemd/system/$unit" "$wants/$unit"; done
git -C "$src" describe --always --dirty > "$app/opt/cube/VERSION" 2>/dev/null || echo unknown > "$app/opt/cube/VERSION"
mksquashfs "$app" "$work/app.squashfs" -comp zstd -Xcompression-level 6 -noappend -quiet -no-progress -no-xattrs

# 4. Boot medium tree: live/ (kernel, initrd, layers in order), templates, grub.cfg.
progress "boot tree"
iso="$work/iso"
mkdir -p "$iso/live" "$iso/cube/templates" "$iso/boot/grub"
ln "$base/filesystem.squashfs" "$iso/live/filesystem.squashfs" 2>/dev/null || cp "$base/filesystem.squashfs" "$iso/live/"
ln "$base/vmlinuz" "$iso/live/vmlinuz" 2>/dev/null || cp "$base/vmlinuz" "$iso/live/"
ln "$base/initrd.img" "$iso/live/initrd.img" 2>/dev/null || cp "$base/initrd.img" "$iso/live/"
mv "$work/app.squashfs" "$iso/live/app.squashfs"
# live-boot stacks the images in this order, the last one on top.
printf 'filesystem.squashfs\napp.squashfs\n' > "$iso/live/filesystem.module"
ln "$template_image" "$iso/cube/templates/$template.squashfs" 2>/dev/null || cp "$template_image" "$iso/cube/templates/$template.squashfs"
cp "$here/grub.cfg" "$iso/boot/grub/grub.cfg"

# 5. Hybrid BIOS (El Torito + MBR) and UEFI (ESP image) ISO.
progress "xorriso: $output"
mkdir -p "$(dirname "$output")"
grub-mkrescue -o "$output.partial" "$iso" -- -volid CUBE_APPLIANCE > "$work/xorriso.log" 2>&1 || {
  tail -20 "$work/xorriso.log" >&2; exit 1; }
mv "$output.partial" "$output"
printf 'done: %s (%s) in %ds\n' "$output" "$(du -h "$output" | cut -f1)" "$((SECONDS - started))"
