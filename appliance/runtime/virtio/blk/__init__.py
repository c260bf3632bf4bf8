"""virtio-blk: a copy-on-write disk over a read-only template image."""
