"""runtime/virtio"""
