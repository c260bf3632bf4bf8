"""qemu's user network runs this for each connection a guest opens to a `guestfwd=...-cmd:`
address (tests/iso/test_iso_cluster.py): the connection is this process's stdin (a socket);
it is relayed to 127.0.0.1:PORT (argv[1]), where another emulated machine's API, etcd or
cluster listener is forwarded. Loopback only. Prints nothing: stdout and stderr are the guest's
connection too. With a LOG path (argv[2]), appends one line per connection: the hex of the first
bytes the guest sent (a TLS handshake starts `16 03`), so a test sees what crossed.
"""

import socket
import sys
import threading

SNIFFED = 3  # a TLS record's type and version; "GET"/"POS" for plain HTTP


def pipe(source: socket.socket, sink: socket.socket, log: str | None = None) -> None:
    try:
        while data := source.recv(1 << 16):
            if log is not None:
                with open(log, "a") as lines:
                    lines.write(data[:SNIFFED].hex(" ") + "\n")
                log = None
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def main() -> None:
    guest = socket.socket(fileno=0)
    try:
        host = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
    except OSError:
        return  # the guest sees its connection closed, as if refused
    host.settimeout(None)
    back = threading.Thread(target=pipe, args=(host, guest), daemon=True)
    back.start()
    pipe(guest, host, sys.argv[2] if len(sys.argv) > 2 else None)
    back.join()


if __name__ == "__main__":
    main()
