"""A host-side TCP echo server that logs how each connection ends: `python echo_server.py PORT`.

For the backend-restart test: a guest's connection stays open through one guestnet process, and
the test needs to know what the host end saw when that process died. Each connection gets a
number (from 1, in accept order) and these lines on stdout, flushed at once:

- ``open N`` when accepted;
- ``data N BYTES`` for each chunk received (echoed back);
- ``eof N`` when the peer closed (a FIN), or ``reset N ERRNO-NAME`` when the socket failed.

Listens on 127.0.0.1 of the namespace it runs in; one thread per connection.
"""

from __future__ import annotations

import errno
import itertools
import socket
import sys
import threading

_lock = threading.Lock()


def say(line: str) -> None:
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def serve(conn: socket.socket, n: int) -> None:
    with conn:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    say(f"eof {n}")
                    return
                say(f"data {n} {len(data)}")
                conn.sendall(data)
        except OSError as exc:
            say(f"reset {n} {errno.errorcode.get(exc.errno or 0, str(exc.errno))}")


def main() -> None:
    port = int(sys.argv[1])
    with socket.create_server(("127.0.0.1", port)) as server:
        for n in itertools.count(1):
            conn, _ = server.accept()
            say(f"open {n}")
            threading.Thread(target=serve, args=(conn, n), daemon=True).start()


if __name__ == "__main__":
    main()
