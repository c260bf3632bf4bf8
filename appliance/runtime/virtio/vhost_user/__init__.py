"""vhost-user backend: serves a virtio device model to a frontend over a Unix socket."""
