"""A workload that serves mutual TLS with the files `sigil agent` keeps fresh, and nothing else
of Sigil: it loads svid.pem (leaf then chain), svid.key and bundle.pem from SVID_DIR, asks every
client for a certificate from the same trust bundle, and answers with the SPIFFE ID it saw.
Before each handshake it looks at the files' modification times and reloads them when the agent
has rotated them, so no restart and no signal is needed.

Environment: SVID_DIR (default /svid), LISTEN_PORT (default 9443).
"""
import http.server
import os
import ssl
import sys
import threading
import time

SVID_DIR = os.environ.get("SVID_DIR", "/svid")
PORT = int(os.environ.get("LISTEN_PORT", "9443"))
FILES = [os.path.join(SVID_DIR, f) for f in ("svid.pem", "svid.key", "bundle.pem")]


class Contexts:
    """The current server context, rebuilt when any of the agent's files changes."""

    def __init__(self):
        self.lock = threading.Lock()
        self.stamp = None
        self.ctx = None

    def current(self):
        stamp = tuple(os.stat(f).st_mtime_ns for f in FILES)
        with self.lock:
            if stamp != self.stamp:
                try:
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                    ctx.load_cert_chain(FILES[0], FILES[1])
                    ctx.load_verify_locations(FILES[2])
                    ctx.verify_mode = ssl.CERT_REQUIRED
                    self.ctx, self.stamp = ctx, stamp
                    print("loaded the agent's files", flush=True)
                except (ssl.SSLError, OSError) as e:
                    # Caught between the agent's renames (a new key, the old certificate):
                    # keep the last good pair and look again at the next connection.
                    if self.ctx is None:
                        raise
                    print(f"keeping the current files for now: {e}", flush=True)
            return self.ctx


CONTEXTS = Contexts()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        peer = self.connection.getpeercert()
        uris = [v for k, v in peer.get("subjectAltName", ()) if k == "URI"]
        body = ("hello " + (uris[0] if uris else "?") + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def get_request(self):
        sock, addr = self.socket.accept()
        sock.settimeout(10)
        try:
            return CONTEXTS.current().wrap_socket(sock, server_side=True), addr
        except (ssl.SSLError, OSError) as e:
            print(f"handshake with {addr[0]} failed: {e}", flush=True)
            sock.close()
            raise


def main():
    # The agent (in its own container) may not have written the files yet.
    while True:
        try:
            CONTEXTS.current()
            break
        except (ssl.SSLError, OSError):
            time.sleep(0.2)
    server = Server(("0.0.0.0", PORT), Handler)
    print(f"serving mutual TLS on :{PORT} with {SVID_DIR}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
