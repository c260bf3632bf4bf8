"""Virtio device models shared by the kvm runtime (over virtio-mmio) and anything
speaking vhost-user (UML's virtio_uml): one folder per device, a transport that
knows nothing of the device, state saved as plain data.
"""
