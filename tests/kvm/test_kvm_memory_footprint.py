"""What a kvm guest's RAM really holds (`GuestMemory.footprint`, what the memory budget charges):
a guest restored from a snapshot's memory file holds privately only the pages it wrote; the
pages it only reads are the file's page cache, which every clone of it shares. Plain mappings,
no /dev/kvm needed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.runtime.kvm import memory as kvm_memory
from appliance.runtime.kvm.memory import PAGE_SIZE, GuestMemory, default_layout

SIZE = 8 << 20  # 2048 pages
HUGE_PAGE = 2 << 20


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every footprint from a new parse of smaps (the budget may use one up to a second old)."""
    monkeypatch.setattr(kvm_memory, "SMAPS_MAX_AGE_S", 0.0)


@pytest.fixture
def memory_file(tmp_path: Path) -> Path:
    path = tmp_path / "memory"
    path.write_bytes(bytes(range(1, 256)) * (SIZE // 255) + b"\x01" * (SIZE % 255))
    return path


@pytest.fixture
def clones(memory_file: Path) -> Iterator[list[GuestMemory]]:
    mapped = [GuestMemory.from_file(memory_file, default_layout(SIZE)) for _ in range(2)]
    yield mapped
    for memory in mapped:
        memory.close()


def touch(memory: GuestMemory, pages: range, *, write: bool) -> None:
    view = memory.regions[0].view
    for page in pages:
        if write:
            view[page * PAGE_SIZE] = 0xEE
        else:
            _ = view[page * PAGE_SIZE]


def test_a_clone_holds_privately_only_the_pages_it_wrote(
    clones: list[GuestMemory], memory_file: Path
) -> None:
    clone, other = clones
    touch(clone, range(300, 340), write=True)
    # Read in other 2 MiB than the writes: a write into a huge page of the file splits it.
    touch(clone, range(1024, 1324), write=False)
    touch(other, range(0, 100), write=True)

    footprint = clone.footprint()
    assert footprint.private_bytes == 40 * PAGE_SIZE
    assert footprint.shared_key == str(memory_file)
    # The pages it read are the memory file's page cache, mapped (at least those 300; the
    # kernel may map their neighbours in the page cache with them).
    assert 300 * PAGE_SIZE <= footprint.shared_bytes <= SIZE
    assert other.footprint().private_bytes == 100 * PAGE_SIZE
    assert clone.resident_bytes() == footprint.private_bytes + footprint.shared_bytes


def test_a_fresh_guest_holds_only_the_pages_it_touched_and_shares_nothing() -> None:
    memory = GuestMemory.anonymous(SIZE)
    try:
        assert memory.footprint().private_bytes == 0
        touch(memory, range(0, 64), write=True)
        footprint = memory.footprint()
        assert (footprint.shared_key, footprint.shared_bytes) == ("", 0)
        # With transparent huge pages the kernel may back part of the written range with a
        # 2 MiB page (seen in the emulated host): the guest then holds all of it.
        assert 64 * PAGE_SIZE <= footprint.private_bytes <= 64 * PAGE_SIZE + HUGE_PAGE
    finally:
        memory.close()


def test_pages_given_back_on_pause_are_no_longer_held(clones: list[GuestMemory]) -> None:
    clone = clones[0]
    touch(clone, range(0, 200), write=True)
    assert clone.footprint().private_bytes == 200 * PAGE_SIZE
    clone.discard_private_pages()  # what a pause does once its diff is on disk
    assert clone.footprint().private_bytes == 0


def test_one_parse_serves_every_guest_until_it_is_too_old_or_lacks_one(
    clones: list[GuestMemory], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kvm_memory, "SMAPS_MAX_AGE_S", 3600.0)
    clone = clones[0]
    assert clone.footprint().private_bytes == 0
    touch(clone, range(0, 10), write=True)
    assert clone.footprint().private_bytes == 0  # the same parse, within its age
    newcomer = GuestMemory.anonymous(SIZE)  # a mapping the last parse has not seen: parsed again
    try:
        assert newcomer.footprint().private_bytes == 0
        assert clone.footprint().private_bytes == 10 * PAGE_SIZE
    finally:
        newcomer.close()


def test_guests_mapped_side_by_side_are_measured_apart() -> None:
    """Anonymous mappings with the same flags placed next to each other are one VMA to the kernel
    (one smaps entry): without guard pages between them, one guest was charged the other's pages
    (and the other nothing)."""
    guests = [GuestMemory.anonymous(SIZE) for _ in range(4)]
    try:
        for count, memory in enumerate(guests, start=1):
            touch(memory, range(0, count * 16), write=True)
        measured = [memory.footprint().private_bytes for memory in guests]
        for count, private in enumerate(measured, start=1):
            assert count * 16 * PAGE_SIZE <= private <= count * 16 * PAGE_SIZE + HUGE_PAGE, measured
    finally:
        for memory in guests:
            memory.close()
