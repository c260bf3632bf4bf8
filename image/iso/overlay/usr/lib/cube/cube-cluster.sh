#!/bin/sh
# The appliance's cluster choice (docs/CLUSTER.md), after cube-data.sh and the network, before
# cube.service: a single node (the default), a new cluster (this node hosts its etcd member), or
# joining one. Chosen on first boot, then kept on CUBE-DATA ($STATE/cluster-mode):
#   - the boot menu's "new cluster" entry, or `cube.cluster=new` on the kernel command line;
#   - `cube.cluster=join cube.etcd=http://10.0.0.1:2379[,...]` on the kernel command line, or
#     what a VM hands over through qemu's fw_cfg: opt/cube/cluster (lines `mode=new` or
#     `mode=join` and `etcd=ENDPOINTS`); joining also needs the cluster's token: fw_cfg
#     opt/cube/cluster-token, or the file $STATE/cluster-token put there beforehand (never on the
#     command line, which every local process can read).
# The node's name in the cluster: `cube.node=NAME` (kernel command line) or `node=NAME` (fw_cfg),
# else `cube-` and six random hex digits, chosen once (every ISO's host name is `cube`: two nodes
# named after it would be one node to the cluster).
# Every boot renders the cluster's files again with this boot's address (`cube node setup`) and,
# in a new cluster, starts this node's etcd member (its unit lives in RAM: rendered each boot).
# Overridable for tests: CUBE_STATE, CUBE_CMDLINE, CUBE_SEED_DIR, CUBE_ADDRESS, CUBE_SYSTEMCTL, CUBE.
set -eu
STATE="${CUBE_STATE:-/var/lib/cube}"
CMDLINE="${CUBE_CMDLINE:-/proc/cmdline}"
SEED_DIR="${CUBE_SEED_DIR:-/sys/firmware/qemu_fw_cfg/by_name/opt/cube}"
SYSTEMCTL="${CUBE_SYSTEMCTL:-systemctl}"
CUBE="${CUBE:-cube}"
MODE_FILE="$STATE/cluster-mode"

say() { echo "cube-cluster: $*"; }

# `cube.KEY=value` of the kernel command line.
cmdline_value() {
  tr ' ' '\n' < "$CMDLINE" | sed -n "s/^cube\.$1=//p" | tail -n 1
}

# `KEY=value` of the fw_cfg seed opt/cube/cluster.
seed_value() {
  [ -r "$SEED_DIR/cluster/raw" ] || return 0
  sed -n "s/^$1=//p" "$SEED_DIR/cluster/raw" | tail -n 1
}

if [ ! -s "$MODE_FILE" ]; then
  [ -n "${CUBE_SEED_DIR:-}" ] || modprobe qemu_fw_cfg 2>/dev/null || true
  mode="$(cmdline_value cluster)"; mode="${mode:-$(seed_value mode)}"
  etcd="$(cmdline_value etcd)"; etcd="${etcd:-$(seed_value etcd)}"
  node="$(cmdline_value node)"; node="${node:-$(seed_value node)}"
  node="${node:-cube-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')}"
  case "$node" in
    "" | [!A-Za-z0-9]* | *[!A-Za-z0-9._-]*)
      say "bad node name $node (letters, digits, . _ -): staying a single node"; exit 0 ;;
  esac
  case "${mode:-single}" in
    single) printf 'mode=single\n' > "$MODE_FILE" ;;
    new) printf 'mode=new\nnode=%s\n' "$node" > "$MODE_FILE" ;;
    join)
      [ -n "$etcd" ] || { say "joining needs cube.etcd=ENDPOINTS: staying a single node"; exit 0; }
      if [ ! -s "$STATE/cluster-token" ] && [ -r "$SEED_DIR/cluster-token/raw" ]; then
        (umask 077; cp "$SEED_DIR/cluster-token/raw" "$STATE/cluster-token")
      fi
      printf 'mode=join\nnode=%s\netcd=%s\n' "$node" "$etcd" > "$MODE_FILE" ;;
    *) say "unknown cube.cluster=$mode (single, new or join): staying a single node"; exit 0 ;;
  esac
fi
mode="$(sed -n 's/^mode=//p' "$MODE_FILE")"
[ "$mode" != single ] || exit 0

if [ -z "${CUBE_ADDRESS:-}" ]; then
  . /usr/lib/cube/lan-address.sh
  for _ in $(seq 1 120); do address="$(lan_address)"; [ -n "$address" ] && break; sleep 0.5; done
fi
address="${CUBE_ADDRESS:-${address:-}}"
[ -n "$address" ] || { say "no network address: the cluster waits for the next boot"; exit 1; }

setup="--token-file $STATE/cluster-token"
node="$(sed -n 's/^node=//p' "$MODE_FILE")"
[ -z "$node" ] || setup="$setup --node-id $node"
if [ "$mode" = new ]; then
  say "a new cluster: this node ($node) hosts its etcd member at $address"
  # shellcheck disable=SC2086
  "$CUBE" --config "$STATE/appliance.toml" node setup --new "$address" $setup \
    --etcd-dir "$STATE/etcd" --etcd-config "$STATE/etcd.yaml" \
    --etcd-unit "${CUBE_ETCD_UNIT:-/etc/systemd/system/cube-etcd.service}"
  "$SYSTEMCTL" daemon-reload
  "$SYSTEMCTL" start cube-etcd.service
else
  etcd="$(sed -n 's/^etcd=//p' "$MODE_FILE")"
  say "joining the cluster of $etcd as node $node at $address"
  # shellcheck disable=SC2086
  "$CUBE" --config "$STATE/appliance.toml" node setup --join "$etcd" --node-address "$address" $setup
fi
