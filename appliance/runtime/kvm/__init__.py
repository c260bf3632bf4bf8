"""The kvm runtime: a microVM monitor in Python over cffi_kvm.

- memory.py    guest RAM (anonymous, or a snapshot's memory file mapped MAP_PRIVATE), dirty log,
               diffs against the memory file (pause) and giving pages back to the host
- machine.py   the VM: in-kernel irqchip + PIT, vCPU threads run from Trio, buses, snapshot/restore
- vcpu.py      KVM_RUN loop and exit dispatch, kick signal, vCPU state as plain bytes
- bus.py       port-I/O and MMIO address buses
- devices/     8250 serial console, i8042 reset
- x86.py       long-mode set-up (GDT, identity page tables, sregs)
- boot.py      Linux loading: PVH / 64-bit boot protocol, bzImage, initramfs, e820
- mptable.py   MP table (vCPUs, IOAPIC) for guests without ACPI
- snapshot.py  state.json (plain data) + memory file (whole, or a diff over a base file)
- pool.py      restore shells made ahead of time, per template snapshot
- template_snapshots.py  one snapshot per template, keyed by kernel/template/VMM/host; refused when stale
- console.py   serial output to the sandbox's console log, a line at a time
- instance.py  KvmInstance: a running sandbox (pause/resume with a diff, snapshot, memory)
- volumes.py   volume slots: empty virtio-blk devices a volume's image is plugged into at the claim
- base_images.py  one copy per template image a memory snapshot cannot hard-link (another filesystem)
- runtime.py   KvmRuntime, runtime.base's Runtime over all of the above
- kernel.py    `cube image build-kvm-kernel` (image/kernel/build.py)
Virtio devices live in runtime/virtio and reach a guest through virtio/mmio.py.
"""
