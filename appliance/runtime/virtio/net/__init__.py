"""virtio-net over a tap device with the virtio-net header (checksum/TSO offloads)."""
