"""One single-threaded WSGI worker for `processes` (benches/autoscale.sh): serves app.py with
the standard library's wsgiref on the listening socket it inherits the systemd way (fd 3,
LISTEN_FDS=1, `processes run --dispatch shared`), one request at a time, like a uWSGI worker
without threads. Says READY=1 on NOTIFY_SOCKET once it accepts; SIGTERM ends it after the
request in hand.
"""
import os
import signal
import socket
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from app import application  # noqa: E402


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


class Server(WSGIServer):
    """Stops gracefully on SIGTERM (how `processes` drains a worker): at once when idle, else
    after the request in hand, as uWSGI does when it cheaps a worker."""

    busy = False
    stopping = False

    def process_request(self, request, client_address):
        self.busy = True
        try:
            super().process_request(request, client_address)
        finally:
            self.busy = False
        if self.stopping:
            sys.exit(0)

    def on_sigterm(self, signum, frame):
        if self.busy:
            self.stopping = True
        else:
            sys.exit(0)


def main():
    if os.environ.get("LISTEN_FDS") != "1" or os.environ.get("LISTEN_PID") not in (None, str(os.getpid())):
        sys.exit("serve.py: expected one listener at fd 3 (LISTEN_FDS=1)")
    server = Server(("127.0.0.1", 0), QuietHandler, bind_and_activate=False)
    signal.signal(signal.SIGTERM, server.on_sigterm)
    server.socket.close()
    server.socket = socket.socket(fileno=3)
    # Non-blocking: the workers share the socket, and a worker that loses the race for a
    # connection goes back to select() instead of blocking in accept().
    server.socket.setblocking(False)
    host, port = server.socket.getsockname()[:2]
    server.server_address = (host, port)
    server.server_name, server.server_port = host, port
    server.setup_environ()
    server.set_app(application)
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        addr = "\0" + notify[1:] if notify.startswith("@") else notify
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", addr)
    server.serve_forever(poll_interval=3600)


if __name__ == "__main__":
    main()
