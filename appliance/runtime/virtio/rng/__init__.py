"""virtio-rng (entropy device): fills the guest's buffers from the host's getrandom()."""
