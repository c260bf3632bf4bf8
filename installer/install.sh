#!/usr/bin/env bash
# Cube appliance installer for an existing Debian 12 / Ubuntu 24.04 host.
#
#   bash installer/install.sh            install (or upgrade) and start the service
#   bash installer/install.sh --dev      also install test dependencies, editable checkout
#   bash installer/install.sh --uninstall
#
# Idempotent: every step checks before it acts, so running it twice is safe.
# Big builds (UML kernel, default template) are cached under /var/cache/cube and
# rebuilt only when their inputs change.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/cube
VENV=$PREFIX/venv
ETC=/etc/cube
STATE=/var/lib/cube
CACHE=/var/cache/cube
LOGDIR=/var/log/cube
RUNDIR=/run/cube
UNIT=/etc/systemd/system/cube.service
MODE=install
START=1

for arg in "$@"; do
  case "$arg" in
    --dev) MODE=dev ;;
    --uninstall) MODE=uninstall ;;
    --no-start) START=0 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
have_systemd() { [ -d /run/systemd/system ] && [ "$(ps -p 1 -o comm=)" = systemd ]; }

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

APT_PACKAGES=(
  # runtime
  user-mode-linux bubblewrap util-linux e2fsprogs iproute2 nftables iptables procps
  python3 python3-venv python3-dev python3-bpfcc bpfcc-tools linux-headers-cloud-amd64
  libseccomp2 zstd ca-certificates curl
  # template and kernel builds
  mmdebstrap linux-source build-essential flex bison bc libelf-dev libssl-dev xz-utils
)
DEV_APT_PACKAGES=(skopeo docker-registry nodejs npm qemu-system-x86 xorriso busybox-static)

stop_service() {
  if have_systemd && systemctl list-unit-files cube.service >/dev/null 2>&1; then
    systemctl stop cube.service 2>/dev/null || true
  fi
  if [ -f "$RUNDIR/cube.pid" ]; then
    local pid; pid=$(cat "$RUNDIR/cube.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$RUNDIR/cube.pid"
  fi
}

if [ "$MODE" = uninstall ]; then
  say "Stopping the service"
  stop_service
  if have_systemd; then systemctl disable cube.service 2>/dev/null || true; fi
  rm -f "$UNIT" /usr/local/bin/cube /usr/local/bin/cubemastercli
  have_systemd && systemctl daemon-reload || true
  say "Removing sandbox namespaces, pins and state"
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^cube-/ {print $1}'); do ip netns delete "$ns" || true; done
  rm -rf /sys/fs/bpf/cube 2>/dev/null || true
  nft delete table inet cube 2>/dev/null || true
  nft delete table ip cube 2>/dev/null || true
  rm -rf "$PREFIX" "$ETC" "$STATE" "$LOGDIR" "$RUNDIR" "$CACHE"
  say "Removed. (apt packages were left installed.)"
  exit 0
fi

say "Checking the host"
. /etc/os-release
case "$ID:${VERSION_ID:-}" in
  debian:12|ubuntu:24.04) ;;
  *) echo "warning: tested on Debian 12 and Ubuntu 24.04, this is $PRETTY_NAME" >&2 ;;
esac
free_gb=$(df -Pk /var | awk 'NR==2 {print int($4/1024/1024)}')
if [ "$free_gb" -lt 8 ]; then
  echo "install.sh: need at least 8 GiB free under /var (have ${free_gb} GiB)" >&2; exit 1
fi

say "Installing Debian packages"
need=()
pkgs=("${APT_PACKAGES[@]}")
[ "$MODE" = dev ] && pkgs+=("${DEV_APT_PACKAGES[@]}")
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  # nodejs may come from another repository with npm bundled: don't fight it.
  if dpkg-query -W -f='${Status}' nodejs 2>/dev/null | grep -q "ok installed"; then
    need=("${need[@]/npm}")
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${need[@]} >/dev/null
fi

say "Linking kernel headers for bcc"
bash "$SRC/appliance/net/install_headers.sh"

say "Creating the Python environment in $VENV"
# Debian's python3 with system site-packages: bcc is Debian's python3-bpfcc.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
  rm -rf "$VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip >/dev/null
if [ "$MODE" = dev ]; then
  "$VENV/bin/pip" install -q -e "$SRC[test]"
else
  "$VENV/bin/pip" install -q "$SRC"
fi
ln -sf "$VENV/bin/cube" /usr/local/bin/cube
ln -sf "$VENV/bin/cubemastercli" /usr/local/bin/cubemastercli

say "Writing the default configuration"
mkdir -p "$ETC" "$STATE" "$CACHE" "$LOGDIR" "$RUNDIR"
chmod 700 "$STATE"
if [ ! -f "$ETC/appliance.toml" ]; then
  install -m 644 "$SRC/installer/appliance.toml" "$ETC/appliance.toml"
fi

say "Building the sandbox kernel (cached in $CACHE/kernels)"
CUBE_IMAGE_DIR="$SRC/image" "$VENV/bin/cube" image build-uml-kernel

say "Building the default template (cached in $CACHE/rootfs)"
CUBE_IMAGE_DIR="$SRC/image" "$VENV/bin/cube" tpl build-default

stop_service
if [ "$START" = 1 ]; then
  say "Starting the service"
  if have_systemd; then
    install -m 644 "$SRC/systemd/cube.service" "$UNIT"
    systemctl daemon-reload
    systemctl enable --now cube.service
    systemctl restart cube.service
  else
    # No systemd (containers, CI): run it as a daemon with the same command line.
    # The service writes its own pid file ($RUNDIR/cube.pid).
    setsid "$VENV/bin/cube" serve >>"$LOGDIR/cube.log" 2>&1 </dev/null &
  fi
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:3000/health" >/dev/null 2>&1 && break
    sleep 0.2
  done
  curl -fsS "http://127.0.0.1:3000/health" >/dev/null || {
    echo "install.sh: the service did not answer on :3000; see $LOGDIR/cube.log" >&2; tail -30 "$LOGDIR/cube.log" >&2 || true; exit 1; }

  KEY_FILE="$STATE/default-api-key"
  if [ ! -s "$KEY_FILE" ]; then
    (umask 077; "$VENV/bin/cube" keys create --name default --json \
      | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["key"])' > "$KEY_FILE")
  fi
  say "Cube appliance is running"
  cat <<EOF
Export these to point the unmodified E2B SDK at it:

  export E2B_API_URL=http://127.0.0.1:3000
  export E2B_SANDBOX_URL=http://127.0.0.1:3000
  export E2B_API_KEY=\$(cat $KEY_FILE)
  export CUBE_TEMPLATE_ID=code-interpreter

EOF
fi
