"""Legacy devices of the microVM: 8250 serial console and the i8042 reset line."""
