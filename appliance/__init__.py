"""Cube appliance: a self-hosted, E2B-compatible sandbox service.

This module stays import-free: `appliance.guest` is copied into every guest
rootfs and imports `appliance` there, where nothing else of the host exists.
"""

__version__ = "0.1.0"
