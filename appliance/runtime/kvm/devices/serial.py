"""8250/16550 UART (COM1) as Linux's `console=ttyS0` drives it.

Output bytes go to a sink (console log); input is queued by the host. The
interrupt line is an eventfd bound to the in-kernel irqchip with KVM_IRQFD, so
raising it never needs the vCPU thread. State is plain data for snapshots.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

# Register offsets from the base port (0x3f8).
DATA = 0  # RBR/THR, or DLL when LCR.DLAB
IER = 1  # or DLM when LCR.DLAB
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RX_DATA = 0x01
IER_THR_EMPTY = 0x02
IIR_NONE = 0x01
IIR_THR_EMPTY = 0x02
IIR_RX_DATA = 0x04
IIR_FIFO_ENABLED = 0xC0
LCR_DLAB = 0x80
LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20
LSR_IDLE = 0x40
MCR_LOOP = 0x10
MSR_CONNECTED = 0xB0  # DCD, DSR, CTS: a terminal is attached


@dataclass
class SerialState:
    ier: int = 0
    lcr: int = 0x03
    mcr: int = 0x08
    scr: int = 0
    dll: int = 0x0C
    dlm: int = 0
    thr_interrupt_pending: bool = False
    rx_pending: bytes = b""


class Serial:
    def __init__(self, sink: Callable[[bytes], None], raise_irq: Callable[[], None]) -> None:
        self._sink = sink
        self._raise_irq = raise_irq
        self.state = SerialState()
        self._rx: deque[int] = deque()
        self.bytes_out = 0

    def queue_input(self, data: bytes) -> None:
        self._rx.extend(data)
        if self.state.ier & IER_RX_DATA:
            self._raise_irq()

    def _iir(self) -> int:
        if self.state.ier & IER_RX_DATA and self._rx:
            return IIR_FIFO_ENABLED | IIR_RX_DATA
        if self.state.ier & IER_THR_EMPTY and self.state.thr_interrupt_pending:
            return IIR_FIFO_ENABLED | IIR_THR_EMPTY
        return IIR_FIFO_ENABLED | IIR_NONE

    def _msr(self) -> int:
        mcr = self.state.mcr
        if not mcr & MCR_LOOP:
            return MSR_CONNECTED
        # Loopback: modem inputs mirror the outputs. Linux's 8250 probe checks this
        # (MCR = LOOP|OUT2|RTS must read back MSR = DCD|CTS) before it uses the port.
        return (
            (0x10 if mcr & 0x02 else 0)  # CTS <- RTS
            | (0x20 if mcr & 0x01 else 0)  # DSR <- DTR
            | (0x40 if mcr & 0x04 else 0)  # RI <- OUT1
            | (0x80 if mcr & 0x08 else 0)  # DCD <- OUT2
        )

    def read(self, offset: int, size: int) -> bytes:
        s = self.state
        value: int
        if offset == DATA:
            if s.lcr & LCR_DLAB:
                value = s.dll
            else:
                value = self._rx.popleft() if self._rx else 0
        elif offset == IER:
            value = s.dlm if s.lcr & LCR_DLAB else s.ier
        elif offset == IIR_FCR:
            value = self._iir()
            # Reading IIR acknowledges a THR-empty interrupt.
            if value & 0x0F == IIR_THR_EMPTY:
                s.thr_interrupt_pending = False
        elif offset == LCR:
            value = s.lcr
        elif offset == MCR:
            value = s.mcr
        elif offset == LSR:
            value = LSR_THR_EMPTY | LSR_IDLE | (LSR_DATA_READY if self._rx else 0)
        elif offset == MSR:
            value = self._msr()
        else:
            value = s.scr
        return bytes([value]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        s = self.state
        value = data[0]
        if offset == DATA:
            if s.lcr & LCR_DLAB:
                s.dll = value
                return
            if s.mcr & MCR_LOOP:
                self._rx.append(value)
            else:
                self._sink(bytes([value]))
                self.bytes_out += 1
            s.thr_interrupt_pending = True
            if s.ier & IER_THR_EMPTY:
                self._raise_irq()
        elif offset == IER:
            if s.lcr & LCR_DLAB:
                s.dlm = value
                return
            was = s.ier
            s.ier = value & 0x0F
            # Enabling THR-empty with an empty THR interrupts at once (Linux relies on it).
            if s.ier & IER_THR_EMPTY and not was & IER_THR_EMPTY:
                s.thr_interrupt_pending = True
                self._raise_irq()
        elif offset == LCR:
            s.lcr = value
        elif offset == MCR:
            s.mcr = value
        elif offset == SCR:
            s.scr = value

    def save(self) -> dict[str, object]:
        self.state.rx_pending = bytes(self._rx)
        return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in asdict(self.state).items()}

    def restore(self, saved: dict[str, object]) -> None:
        values = dict(saved)
        values["rx_pending"] = bytes.fromhex(str(values["rx_pending"]))
        self.state = SerialState(**values)  # type: ignore[arg-type]
        self._rx = deque(self.state.rx_pending)
