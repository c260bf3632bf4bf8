"""qemu's user network runs this for each connection a guest opens to a `guestfwd=...-cmd:`
address (tests/iso/test_iso_cluster.py): the connection is this process's stdin (a socket);
it is relayed to 127.0.0.1:PORT (argv[1]), where another emulated machine's API or etcd is
forwarded. Loopback only. Prints nothing: stdout and stderr are the guest's connection too.
"""

import socket
import sys
import threading


def pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
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
    pipe(guest, host)
    back.join()


if __name__ == "__main__":
    main()
