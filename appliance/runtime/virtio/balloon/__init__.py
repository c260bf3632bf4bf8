"""virtio-balloon, free page reporting only: the host punches reported pages out of guest memory."""
