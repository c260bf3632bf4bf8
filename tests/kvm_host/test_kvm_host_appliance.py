"""The appliance on an emulated KVM host (AMD SVM with nested paging, emulated by qemu):
it finds KVM usable, picks the kvm runtime by itself (its configuration names none) and
ships what that runtime boots, so `cube doctor` and the running service agree."""

from __future__ import annotations

import json

from emulated_host import EmulatedHost


def test_doctor_says_kvm_is_usable_and_picks_kvm_with_no_configuration(kvm_host: EmulatedHost) -> None:
    assert "runtime" not in kvm_host.run("cat /etc/cube/appliance.toml").check().stdout
    assert kvm_host.run("test -d /sys/module/kvm_amd").status == 0, "kvm_amd did not load by itself"
    doctor = json.loads(kvm_host.run("cube doctor --json", timeout=300).check().stdout)
    kvm = next(check for check in doctor["checks"] if check["name"] == "kvm")
    assert kvm["ok"], doctor
    assert kvm["detail"].startswith("SVM, /dev/kvm usable, guest kernel: /var/cache/cube/kernels/microvm-"), (
        kvm
    )
    assert doctor["runtime"] == "kvm", doctor
    assert "hardware virtualization, SVM" in doctor["reason"], doctor
    # The running service chose the same, by itself.
    journal = kvm_host.run("journalctl -u cube.service -o cat --no-pager | grep 'sandbox runtime:'").check()
    assert "sandbox runtime: kvm (KVM is usable (hardware virtualization, SVM)" in journal.stdout, (
        journal.stdout
    )
