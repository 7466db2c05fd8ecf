"""A host-side HTTP server for VM tests: `python http_server.py PORT DIR` on 127.0.0.1 and ::1.

GET serves the files in DIR (http.server's handler). POST reads the body (Content-Length bytes)
and answers with its sha256 in hex, so a guest can prove an upload arrived intact by comparing
the answer with its own `sha256sum`. Both loopback addresses are served (one listener each, bound
before either serves), so a guest reaches it as the gateway over IPv4 (10.0.2.2) and IPv6 (fd00::2).
"""

from __future__ import annotations

import functools
import hashlib
import socket
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

#: Largest upload accepted: the tests send a few MiB at most.
MAX_BODY_BYTES = 64 << 20
READ_CHUNK_BYTES = 1 << 16


class Handler(SimpleHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_BODY_BYTES:
            self.send_error(413)
            return
        digest = hashlib.sha256()
        left = length
        while left:
            chunk = self.rfile.read(min(left, READ_CHUNK_BYTES))
            if not chunk:
                self.send_error(400, "body shorter than Content-Length")
                return
            digest.update(chunk)
            left -= len(chunk)
        body = f"{digest.hexdigest()}  {length}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def main() -> None:
    port, directory = int(sys.argv[1]), sys.argv[2]
    handler = functools.partial(Handler, directory=directory)
    with (
        Server6(("::1", port), handler) as v6,
        ThreadingHTTPServer(("127.0.0.1", port), handler) as v4,
    ):
        threading.Thread(target=v6.serve_forever, daemon=True).start()
        v4.serve_forever()


if __name__ == "__main__":
    main()
