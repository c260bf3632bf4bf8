#!/usr/bin/env bash
# Cube appliance installer for an existing Debian 12 / Ubuntu 24.04 host.
#
#   bash installer/install.sh              install (or repair, or upgrade from this checkout) and start
#   bash installer/install.sh --check      preflight only: OS, KVM kind, kernel headers, free disk
#   bash installer/install.sh --dev        also test dependencies; the venv gets an editable checkout
#   bash installer/install.sh --no-start   install, do not start the service
#   bash installer/install.sh --no-build   skip the sandbox kernel and default template builds
#   bash installer/install.sh --uninstall [--keep-cache]
#                                          remove everything the installer added (apt packages stay)
#   --root DIR   install into / uninstall from DIR instead of / (packaging, tests). Host-wide steps
#                (apt, kernel header links, systemd, service start, netns, bpf pins, nftables,
#                cgroups) are skipped; it implies --no-start.
#   A multi-node cluster (docs/CLUSTER.md; without these: a single node, unchanged):
#   --cluster [--advertise ADDR]   a new cluster: this node hosts its etcd member (cube-etcd.service,
#                data in /var/lib/cube/etcd) at ADDR (default: the default route's IPv4 address)
#                and gets a new cluster token (/etc/cube/cluster-token: copy it to the other nodes)
#   --join ENDPOINTS [--advertise ADDR]   join the cluster whose etcd client URLs these are
#                (http://10.0.0.1:2379,...); the token from --token-file FILE or CUBE_CLUSTER_TOKEN
#   --node-id ID (default: the host name)   --token-file FILE (copied to /etc/cube/cluster-token)
#   --join ... --etcd-member INITIAL_CLUSTER   also host a new member of the cluster's etcd (HA),
#                after `etcdctl member add ID --peer-urls=http://ADDR:2380` (what it printed)
#   The nodes call each other on port 3444 (cluster_port: TLS with certificates every node derives
#   from the cluster token), etcd on 2379/2380: open these between the nodes only.
#
# Idempotent: every step checks before it acts, so running it twice is safe.
# Big builds (UML kernel, default template) are cached under /var/cache/cube and
# rebuilt only when their inputs change. No user account is created: sandboxes run
# as bare uids (uid_base + slot) that own nothing outside their sandbox.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=install
DEV=0
START=1
BUILD=1
KEEP_CACHE=0
ROOT=
CLUSTER=            # new | join
ETCD_ENDPOINTS=
ADVERTISE=
NODE_ID=
TOKEN_SOURCE=
ETCD_MEMBER=
CLUSTER_OPTIONS=0

while [ "$#" -gt 0 ]; do
  case "$1" in
    --check) MODE=check ;;
    --dev) DEV=1 ;;
    --uninstall) MODE=uninstall ;;
    --no-start) START=0 ;;
    --no-build) BUILD=0 ;;
    --keep-cache) KEEP_CACHE=1 ;;
    --root) shift; ROOT="$(realpath -m "${1:?--root needs a directory}")" ;;
    --root=*) ROOT="$(realpath -m "${1#--root=}")" ;;
    --cluster) CLUSTER="${CLUSTER:+both}"; CLUSTER="${CLUSTER:-new}" ;;
    # An option's value is the next argument; missing, it is empty (refused below).
    --join) CLUSTER="${CLUSTER:+both}"; CLUSTER="${CLUSTER:-join}"; ETCD_ENDPOINTS="${2:-}"; shift $(($# > 1)) ;;
    --advertise) ADVERTISE="${2:-}"; CLUSTER_OPTIONS=1; shift $(($# > 1)) ;;
    --node-id) NODE_ID="${2:-}"; CLUSTER_OPTIONS=1; shift $(($# > 1)) ;;
    --token-file) TOKEN_SOURCE="${2:-}"; CLUSTER_OPTIONS=1; shift $(($# > 1)) ;;
    --etcd-member) ETCD_MEMBER="${2:-}"; CLUSTER_OPTIONS=1; shift $(($# > 1)) ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$ROOT" = / ] && ROOT=

usage_error() { echo "install.sh: $*" >&2; exit 2; }
case "$CLUSTER" in
  new) ;;
  both) usage_error "--cluster (a new cluster) and --join (an existing one) exclude each other" ;;
  join) printf '%s\n' "$ETCD_ENDPOINTS" | grep -qE '^https?://[^,/ ]+:[0-9]+(,https?://[^,/ ]+:[0-9]+)*$' \
          || usage_error "--join needs etcd client URLs: http://HOST:PORT[,http://HOST:PORT...]" ;;
  "") if [ "$CLUSTER_OPTIONS" = 1 ]; then
        usage_error "--advertise, --node-id, --token-file and --etcd-member go with --cluster or --join"
      fi ;;
  *) usage_error "bad cluster mode $CLUSTER" ;;
esac
if [ -n "$TOKEN_SOURCE" ]; then
  [ "$CLUSTER" = join ] || usage_error "--token-file goes with --join (a new cluster makes its own token)"
  [ -f "$TOKEN_SOURCE" ] && [ -r "$TOKEN_SOURCE" ] || usage_error "--token-file $TOKEN_SOURCE: no such readable file"
fi
if [ -n "$ETCD_MEMBER" ] && [ "$CLUSTER" != join ]; then
  usage_error "--etcd-member goes with --join (--cluster makes the first member itself)"
fi
if [ -n "$ADVERTISE" ] && ! printf '%s\n' "$ADVERTISE" | grep -qE '^([0-9]{1,3}\.){3}[0-9]{1,3}$|:'; then
  usage_error "--advertise needs this node's IP address"
fi
[ -n "$ROOT" ] && START=0

PREFIX=$ROOT/opt/cube
VENV=$PREFIX/venv
ETC=$ROOT/etc/cube
STATE=$ROOT/var/lib/cube
CACHE=$ROOT/var/cache/cube
LOGDIR=$ROOT/var/log/cube
RUNDIR=$ROOT/run/cube
UNIT=$ROOT/etc/systemd/system/cube.service
ETCD_UNIT=$ROOT/etc/systemd/system/cube-etcd.service
LOGROTATE=$ROOT/etc/logrotate.d/cube
BINDIR=$ROOT/usr/local/bin
HEADER_LINKS=$PREFIX/header-links  # kernel header links this installer made (removed by --uninstall)
MIN_FREE_GB=8

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
warn() { echo "install.sh: warning: $*" >&2; }
host_wide() { [ -z "$ROOT" ]; }
have_systemd() { [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }

# Preflight.

kvm_kind() {
  # What the sandboxes get: hardware KVM (kvm runtime), PVM (a KVM a normal
  # Linux guest cannot boot under: uml runtime) or none (uml runtime).
  if [ ! -e /dev/kvm ]; then
    echo "none (no /dev/kvm): sandboxes use the uml runtime"
  elif [ -d /sys/module/kvm_pvm ]; then
    echo "PVM (kvm_pvm): sandboxes use the uml runtime unless a PVM guest kernel is configured"
  elif grep -qwE 'vmx|svm' /proc/cpuinfo; then
    echo "hardware ($(grep -owE 'vmx|svm' /proc/cpuinfo | head -n 1)): sandboxes can use the kvm runtime"
  else
    echo "unknown (/dev/kvm without vmx/svm): sandboxes use the uml runtime"
  fi
}

headers_state() {
  local moddir="/lib/modules/$(uname -r)"
  if [ -L "$moddir/build" ] && [ -e "$moddir/build/" ]; then
    echo "linked: $moddir/build -> $(readlink "$moddir/build") (bcc's tc programs need only uapi)"
  elif [ -e "$moddir/build/include/linux" ]; then
    echo "present ($moddir/build)"
  elif ls -d /usr/src/linux-headers-*-cloud-amd64 >/dev/null 2>&1; then
    echo "missing; will link Debian's cloud headers into $moddir (bcc's tc programs need only uapi)"
  else
    echo "missing; the installer installs $(headers_package)"
  fi
}

headers_package() {
  # The running kernel's own headers when the archive has them, else Debian's cloud flavour.
  if apt-cache show "linux-headers-$(uname -r)" >/dev/null 2>&1; then
    echo "linux-headers-$(uname -r)"
  else
    echo linux-headers-cloud-amd64
  fi
}

free_gb() {
  local dir="$ROOT/var"
  while [ ! -d "$dir" ]; do dir="$(dirname "$dir")"; done
  df -Pk "$dir" | awk 'NR==2 {print int($4/1024/1024)}'
}

preflight() {
  local ok=0 os="unknown"
  if [ -r /etc/os-release ]; then
    # shellcheck disable=SC1091
    os="$(. /etc/os-release && echo "${ID:-?}:${VERSION_ID:-?} (${PRETTY_NAME:-?})")"
  fi
  case "$os" in
    debian:12*|ubuntu:24.04*) echo "os:        $os" ;;
    *) echo "os:        $os — tested on Debian 12 and Ubuntu 24.04 only" ;;
  esac
  echo "arch:      $(uname -m)"
  [ "$(uname -m)" = x86_64 ] || { echo "           x86_64 only"; ok=1; }
  echo "kvm:       $(kvm_kind)"
  echo "headers:   $(headers_state)"
  local free; free="$(free_gb)"
  if [ "$free" -lt "$MIN_FREE_GB" ]; then
    echo "disk:      ${free} GiB free under $ROOT/var — need at least $MIN_FREE_GB GiB"; ok=1
  else
    echo "disk:      ${free} GiB free under $ROOT/var"
  fi
  echo "systemd:   $(have_systemd && echo "yes (cube.service)" || echo "no (cube serve runs as a daemon, pid file $RUNDIR/cube.pid)")"
  return "$ok"
}

# Service.

stop_service() {
  if host_wide && have_systemd && systemctl list-unit-files cube.service >/dev/null 2>&1; then
    systemctl stop cube.service 2>/dev/null || true
  fi
  if [ -f "$RUNDIR/cube.pid" ]; then
    local pid; pid=$(cat "$RUNDIR/cube.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 900); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$RUNDIR/cube.pid"
  fi
}

# A cluster's etcd member on this node (--cluster).

lan_address() {
  # The IPv4 address of the default route's interface (what the other nodes reach).
  local dev
  dev="$(ip -4 route show default 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')"
  [ -n "$dev" ] && ip -4 -o addr show dev "$dev" scope global 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}'
}

setup_cluster() {
  local address="${ADVERTISE:-$(lan_address)}" args=()
  [ -n "$address" ] || { echo "install.sh: no address for this node: give --advertise ADDR" >&2; exit 1; }
  say "Setting this node up for the cluster ($([ "$CLUSTER" = new ] && echo "a new one, its etcd member here" || echo "joining $ETCD_ENDPOINTS"))"
  if [ -n "$TOKEN_SOURCE" ]; then
    install -m 600 "$TOKEN_SOURCE" "$ETC/cluster-token"  # never echoed
  fi
  if [ "$CLUSTER" = new ]; then args+=(--new "$address"); else args+=(--join "$ETCD_ENDPOINTS" --node-address "$address"); fi
  [ -n "$NODE_ID" ] && args+=(--node-id "$NODE_ID")
  [ -n "$ETCD_MEMBER" ] && args+=(--etcd-member "$ETCD_MEMBER")
  "$VENV/bin/cube" --config "$ETC/appliance.toml" node setup "${args[@]}" \
    --token-file "$ETC/cluster-token" --etcd-dir "$STATE/etcd" --etcd-config "$ETC/etcd.yaml" --etcd-unit "$ETCD_UNIT"
}

start_etcd() {
  say "Starting this node's etcd member"
  if have_systemd; then
    systemctl daemon-reload
    systemctl enable --now cube-etcd.service
  else
    stop_etcd_daemon
    setsid /usr/bin/etcd --config-file "$ETC/etcd.yaml" >>"$LOGDIR/etcd.log" 2>&1 </dev/null &
    echo $! > "$RUNDIR/etcd.pid"
  fi
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:2379/health" 2>/dev/null | grep -q '"health":"true"' && return 0
    sleep 0.2
  done
  echo "install.sh: etcd did not become healthy; see journalctl -u cube-etcd or $LOGDIR/etcd.log" >&2
  exit 1
}

stop_etcd_daemon() {
  # The etcd this installer started without systemd (its pid file).
  [ -f "$RUNDIR/etcd.pid" ] || return 0
  local pid; pid=$(cat "$RUNDIR/etcd.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$RUNDIR/etcd.pid"
}

# Uninstall.

end_outliving_sandboxes() {
  # Sandboxes outlive a stop (their supervisors keep them for the next start): a last start
  # of this install's service takes them over and ends each one with everything it holds on
  # the host (guest, supervisor, network, cgroup leaves, files), as an interactive stop does.
  local supervisors
  supervisors="$(ls -A "$RUNDIR/supervisors" 2>/dev/null || true)"
  [ -n "$supervisors" ] || return 0
  if [ ! -x "$VENV/bin/cube" ]; then
    warn "sandboxes outlived the service but $VENV/bin/cube is gone: left to the host-wide clean-up"
    return 0
  fi
  say "Ending the sandboxes that outlived the service"
  "$VENV/bin/cube" --config "$ETC/appliance.toml" serve --end-sandboxes \
    || warn "cube serve --end-sandboxes failed: left to the host-wide clean-up"
}

remove_host_wide_leftovers() {
  say "Ending sandboxes; removing sandbox namespaces, eBPF pins, nftables tables and cgroups"
  # Sandboxes outlive a stop (their supervisors keep them for the next start): end them,
  # supervisors and guests, by the cgroup leaves they are in.
  for procs in /sys/fs/cgroup/cube/*/cgroup.procs /sys/fs/cgroup/*/cube/*/cgroup.procs; do
    [ -f "$procs" ] && xargs -r kill -KILL < "$procs" 2>/dev/null || true
  done
  sleep 1  # killed tasks leave their cgroups a moment after they are reaped
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^cube-/ {print $1}'); do ip netns delete "$ns" || true; done
  rm -rf /sys/fs/bpf/cube 2>/dev/null || true
  nft delete table inet cube 2>/dev/null || true
  nft delete table ip cube 2>/dev/null || true
  for parent in /sys/fs/cgroup/cube /sys/fs/cgroup/*/cube; do
    [ -d "$parent" ] || continue
    for leaf in "$parent"/*/; do [ -d "$leaf" ] && rmdir "$leaf" 2>/dev/null || true; done
    rmdir "$parent" 2>/dev/null || true
  done
  if [ -f "$HEADER_LINKS" ]; then
    while read -r link; do
      [ -L "$link" ] && rm -f "$link"
      rmdir "$(dirname "$link")" 2>/dev/null || true  # /lib/modules/<release> if it held only our links
    done < "$HEADER_LINKS"
  fi
}

if [ "$MODE" = check ]; then
  preflight
  exit $?
fi

[ "$(id -u)" = 0 ] || [ -n "$ROOT" ] || { echo "install.sh: run as root" >&2; exit 1; }

if [ "$MODE" = uninstall ]; then
  say "Stopping the service"
  stop_service
  end_outliving_sandboxes
  if host_wide && have_systemd; then
    systemctl disable cube.service 2>/dev/null || true
    [ -f "$ETCD_UNIT" ] && { systemctl disable --now cube-etcd.service 2>/dev/null || true; }
  fi
  stop_etcd_daemon
  rm -f "$UNIT" "$ETCD_UNIT" "$LOGROTATE" "$BINDIR/cube" "$BINDIR/cubemastercli"
  if host_wide; then
    have_systemd && systemctl daemon-reload || true
    remove_host_wide_leftovers
  fi
  say "Removing $PREFIX $ETC $STATE $LOGDIR $RUNDIR$([ "$KEEP_CACHE" = 1 ] || echo " $CACHE")"
  rm -rf "$PREFIX" "$ETC" "$STATE" "$LOGDIR" "$RUNDIR"
  [ "$KEEP_CACHE" = 1 ] || rm -rf "$CACHE"
  say "Removed. (apt packages were left installed.)"
  exit 0
fi

say "Checking the host"
preflight || { echo "install.sh: the host does not meet the requirements above" >&2; exit 1; }

APT_PACKAGES=(
  # runtime
  user-mode-linux bubblewrap util-linux e2fsprogs iproute2 nftables iptables procps logrotate
  python3 python3-venv python3-dev python3-bpfcc bpfcc-tools
  libseccomp2 zstd ca-certificates curl xorriso
  # multi-node clusters (docs/CLUSTER.md): etcd 3.4; its unit stays off unless a cluster is set up
  etcd-server
  # template and kernel builds
  mmdebstrap linux-source build-essential flex bison bc libelf-dev libssl-dev xz-utils
)
DEV_APT_PACKAGES=(skopeo docker-registry nodejs npm qemu-system-x86 ovmf busybox-static
  grub-pc-bin grub-efi-amd64-bin grub-common mtools squashfs-tools  # the last five: cube image build-iso; ovmf: tests/iso's UEFI boot
  # The code interpreter's languages, as the default template has them (tests/guest run the agent here)
  r-base-core r-cran-irkernel openjdk-17-jdk-headless node-typescript node-acorn
  chromium)  # tests/dashboard drive the dashboard in it (Playwright, never a downloaded browser)

if host_wide; then
  say "Installing Debian packages"
  need=()
  pkgs=("${APT_PACKAGES[@]}")
  [ "$DEV" = 1 ] && pkgs+=("${DEV_APT_PACKAGES[@]}")
  [ -e "/lib/modules/$(uname -r)/build/" ] || pkgs+=("$(headers_package)")
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
    # Debian enables etcd's own unit on install; a single node needs none (docs/CLUSTER.md).
    if printf '%s\n' "${need[@]}" | grep -qx etcd-server && have_systemd; then
      systemctl disable --now etcd.service 2>/dev/null || true
    fi
  fi

  say "Linking kernel headers for bcc"
  moddir="/lib/modules/$(uname -r)"
  had_links=0; [ -L "$moddir/build" ] && had_links=1
  bash "$SRC/appliance/net/install_headers.sh"
  mkdir -p "$PREFIX"
  if [ -L "$moddir/build" ] && { [ "$had_links" = 0 ] || [ -f "$HEADER_LINKS" ]; }; then
    printf '%s\n' "$moddir/build" "$moddir/source" > "$HEADER_LINKS"
  fi
else
  say "Skipping apt packages and kernel header links (--root $ROOT)"
fi

say "Creating the Python environment in $VENV"
# Debian's python3 with system site-packages: bcc is Debian's python3-bpfcc.
# $VENV may be a symlink into $PREFIX/venvs (made by `cube upgrade`): kept as it is.
if [ ! -x "$VENV/bin/python" ] || { host_wide && ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; }; then
  rm -rf "$VENV"
  mkdir -p "$PREFIX"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
if [ "$DEV" = 1 ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$SRC[test,bench]"
else
  # With the bench extra: `cube bench` drives the appliance through the E2B SDK.
  "$VENV/bin/pip" install -q --disable-pip-version-check "$SRC[bench]"
fi
mkdir -p "$BINDIR"
ln -sfn "$VENV/bin/cube" "$BINDIR/cube"
ln -sfn "$VENV/bin/cubemastercli" "$BINDIR/cubemastercli"

say "Writing the configuration, the systemd unit and the log rotation"
mkdir -p "$ETC" "$STATE" "$CACHE" "$LOGDIR" "$RUNDIR" "$(dirname "$UNIT")" "$(dirname "$LOGROTATE")"
chmod 700 "$STATE"
if [ ! -f "$ETC/appliance.toml" ]; then
  install -m 644 "$SRC/installer/appliance.toml" "$ETC/appliance.toml"
fi
install -m 644 "$SRC/systemd/cube.service" "$UNIT"
install -m 644 "$SRC/installer/logrotate.conf" "$LOGROTATE"
[ -z "$CLUSTER" ] || setup_cluster

if [ "$BUILD" = 1 ]; then
  say "Building the sandbox kernel (cached in $CACHE/kernels)"
  CUBE_IMAGE_DIR="$SRC/image" CUBE_CACHE_DIR="$CACHE" CUBE_STATE_DIR="$STATE" \
    "$VENV/bin/cube" image build-uml-kernel

  if [ -e /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
    # Hardware virtualization: sandboxes get the kvm runtime, which boots this kernel
    # (without it the service falls back to uml and `cube doctor` says why).
    say "Building the kvm guest kernel (cached in $CACHE/kernels)"
    CUBE_IMAGE_DIR="$SRC/image" CUBE_CACHE_DIR="$CACHE" CUBE_STATE_DIR="$STATE" \
      "$VENV/bin/cube" image build-kvm-kernel
  fi

  say "Building the default template (cached in $CACHE/rootfs)"
  CUBE_IMAGE_DIR="$SRC/image" CUBE_CACHE_DIR="$CACHE" CUBE_STATE_DIR="$STATE" \
    "$VENV/bin/cube" tpl build-default
fi

KEY_FILE="$STATE/default-api-key"
if [ "$START" = 1 ]; then
  stop_service
  if [ "$CLUSTER" = new ] || [ -n "$ETCD_MEMBER" ]; then start_etcd; fi
  say "Starting the service"
  if have_systemd; then
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
    echo "install.sh: the service did not answer on :3000; see $LOGDIR/cube.log or journalctl -u cube" >&2
    tail -30 "$LOGDIR/cube.log" >&2 || true; exit 1; }

  if [ ! -s "$KEY_FILE" ]; then
    (umask 077; "$VENV/bin/cube" keys create --name default --json \
      | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["key"])' > "$KEY_FILE")
  fi
  say "Cube appliance is running"
else
  say "Cube appliance is installed (not started: $([ -n "$ROOT" ] && echo "--root" || echo "--no-start"))"
fi
cat <<EOF
Export these to point the unmodified E2B SDK at it:

  export E2B_API_URL=http://127.0.0.1:3000
  export E2B_SANDBOX_URL=http://127.0.0.1:3000
  export E2B_API_KEY=\$(cat $KEY_FILE)
  export CUBE_TEMPLATE_ID=code-interpreter

EOF
