"""Templates: the root filesystem image and the metadata a sandbox is started from."""
