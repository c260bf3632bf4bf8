from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from appliance.runtime.detect import detect_host
from cffi_kvm import Kvm


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    """/dev/kvm opened; tests that need it are skipped (with the detector's reason) without it."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip(f"/dev/kvm not usable: {detect_host().reason}")
    with Kvm() as k:
        yield k
