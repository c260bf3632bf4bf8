"""Host detection: which KVM flavour, and which runtime a host gets and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import Config
from appliance.runtime import detect


def config_for(tmp_path: Path, **overrides: object) -> Config:
    values: dict[str, object] = {"cache_dir": tmp_path / "cache", "uml_kernel": None, **overrides}
    return Config(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("module", "kind"), [("kvm_intel", "VMX"), ("kvm_amd", "SVM"), ("kvm_pvm", "PVM")])
def test_kvm_kind_from_the_loaded_module(tmp_path: Path, module: str, kind: str) -> None:
    (tmp_path / module).mkdir()
    assert detect.kvm_kind(tmp_path) == kind


def test_no_kvm_module_means_none(tmp_path: Path) -> None:
    assert detect.kvm_kind(tmp_path) == "none"


def test_pvm_without_a_pvm_kernel_falls_back_to_uml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect, "kvm_kind", lambda: "PVM")
    monkeypatch.setattr(detect, "_kvm_usable", lambda device: True)
    uml = tmp_path / "linux"
    uml.touch()
    fake_kvm = tmp_path / "kvm"
    fake_kvm.touch()
    host = detect.detect_host(config_for(tmp_path, uml_kernel=uml), kvm_device=fake_kvm)
    assert (host.kvm, host.runtime, host.uml_kernel) == ("PVM", "uml", str(uml))
    assert "PVM" in host.reason and "CONFIG_PVM_GUEST" in host.reason
    assert host.as_dict()["runtime"] == "uml"

    pvm_kernel = tmp_path / "vmlinux-pvm"
    pvm_kernel.touch()
    host = detect.detect_host(
        config_for(tmp_path, uml_kernel=uml, kvm_guest_kernel=pvm_kernel), kvm_device=fake_kvm
    )
    assert host.runtime == "kvm" and host.pvm_guest_kernel == str(pvm_kernel)


def test_vmx_host_gets_kvm_and_no_kvm_no_uml_gets_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(detect, "kvm_kind", lambda: "VMX")
    monkeypatch.setattr(detect, "_kvm_usable", lambda device: True)
    fake_kvm = tmp_path / "kvm"
    fake_kvm.touch()
    assert detect.detect_host(config_for(tmp_path), kvm_device=fake_kvm).runtime == "kvm"

    monkeypatch.setattr(detect, "DEBIAN_UML", tmp_path / "absent")
    monkeypatch.setattr(detect.shutil, "which", lambda name: None)
    host = detect.detect_host(config_for(tmp_path), kvm_device=tmp_path / "no-kvm")
    assert host.runtime == "none" and "user-mode-linux" in host.reason
