"""A stand-in Sentry server on loopback for offline tests: ``python -m tests.sentry_sink
PORTFILE OUTFILE`` writes its port to PORTFILE and one JSON line per received envelope
item (events, messages) to OUTFILE. No network, no SDK internals patched."""

from __future__ import annotations

import gzip
import json
import sys
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def items(body: bytes) -> list[dict[str, object]]:
    """The JSON payloads of an envelope (header line, then item header + payload pairs)."""
    lines = body.split(b"\n")
    out = []
    for i in range(1, len(lines) - 1, 2):
        try:
            header, payload = json.loads(lines[i]), json.loads(lines[i + 1])
        except ValueError:
            continue
        if header.get("type") in ("event", "transaction"):
            out.append(payload)
    return out


def main(portfile: str, outfile: str) -> None:
    out = Path(outfile)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            encoding = self.headers.get("Content-Encoding", "")
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            with out.open("a", encoding="utf-8") as f:
                for item in items(body):
                    f.write(json.dumps(item) + "\n")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Path(portfile).write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
