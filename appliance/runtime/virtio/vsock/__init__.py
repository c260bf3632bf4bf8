"""virtio-vsock with Firecracker's host side: guest ports map to Unix sockets."""
