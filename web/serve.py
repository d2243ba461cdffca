"""Serves web/dist for `./dev up`: on loopback, and only to requests addressed to loopback.

A page elsewhere that points its own name at 127.0.0.1 (DNS rebinding) gets 403 rather than
config.json and its dev token. Nothing is cached.

    python3 web/serve.py PORT
"""

import functools
import http.server
import pathlib
import sys

LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}


class Handler(http.server.SimpleHTTPRequestHandler):
    def send_head(self):
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        if host not in LOOPBACK:
            self.send_error(403, "this page is served to loopback addresses only")
            return None
        return super().send_head()

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


def main():
    port = int(sys.argv[1])
    dist = pathlib.Path(__file__).parent / "dist"
    handler = functools.partial(Handler, directory=str(dist))
    http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()


if __name__ == "__main__":
    main()
