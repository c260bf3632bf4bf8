"""runtime/kvm"""
