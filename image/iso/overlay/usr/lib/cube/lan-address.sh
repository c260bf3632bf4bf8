# Sourced by cube-console.sh and cube-cluster.sh: lan_address prints the address other machines
# reach this one at: the IPv4 address of the default route's interface (DHCP or static, on the
# LAN). Never one of the appliance's own sandbox networks, whose addresses are global too: the
# host ends of the sandboxes' veths (cube<tag>-<slot>) and the sandboxes' DNS resolver on lo
# (label lo:cube<tag>). Without a default route (no DHCP answer yet, or an isolated LAN): the
# first global address of a physical-looking interface, else nothing.
lan_address() {
  dev="$(ip -4 route show default 2>/dev/null \
    | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')"
  if [ -n "$dev" ]; then
    ip -4 -o addr show dev "$dev" scope global 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}'
  else
    ip -4 -o addr show scope global 2>/dev/null \
      | awk '$2 != "lo" && $2 !~ /^cube/ && !/ lo:/ {split($4, a, "/"); print a[1]; exit}'
  fi
}
