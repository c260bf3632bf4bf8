"""The 8250 model against the checks Linux's serial8250 autoconfig makes before using a port."""

from __future__ import annotations

from appliance.runtime.kvm.devices.serial import IER, IIR_FCR, LCR, LSR, MCR, MSR, SCR, Serial


def make() -> tuple[Serial, list[bytes], list[int]]:
    out: list[bytes] = []
    irqs: list[int] = []
    return Serial(out.append, lambda: irqs.append(1)), out, irqs


def reg(serial: Serial, offset: int, value: int | None = None) -> int:
    if value is None:
        return serial.read(offset, 1)[0]
    serial.write(offset, bytes([value]))
    return value


def test_linux_probe_sequence_finds_a_16550a() -> None:
    serial, _, _ = make()
    reg(serial, SCR, 0xA5)
    assert reg(serial, SCR) == 0xA5  # scratch register present
    reg(serial, IER, 0)
    assert reg(serial, IER) == 0
    reg(serial, IER, 0x0F)
    assert reg(serial, IER) == 0x0F
    reg(serial, IER, 0)
    reg(serial, MCR, 0x10 | 0x0A)  # loopback, OUT2, RTS
    assert reg(serial, MSR) & 0xF0 == 0x90
    reg(serial, MCR, 0x0B)
    reg(serial, IIR_FCR, 0x07)  # enable FIFOs
    assert reg(serial, IIR_FCR) & 0xC0 == 0xC0  # 16550A
    assert reg(serial, LSR) & 0x60 == 0x60  # transmitter empty


def test_output_interrupts_and_input_is_read_back() -> None:
    serial, out, irqs = make()
    reg(serial, LCR, 0x03)
    reg(serial, IER, 0x03)  # rx data + THR empty
    assert irqs  # enabling THR-empty interrupts at once
    serial.write(0, b"h")
    serial.write(0, b"i")
    assert b"".join(out) == b"hi" and serial.bytes_out == 2
    serial.queue_input(b"x")
    assert reg(serial, LSR) & 0x01
    assert reg(serial, IIR_FCR) & 0x0F == 0x04  # rx data available
    assert reg(serial, 0) == ord("x")
    state = serial.save()
    other, _, _ = make()
    other.restore(state)
    assert reg(other, IER) == 0x03
