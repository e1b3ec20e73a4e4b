"""The CPU-bound WSGI app of benches/autoscale.sh, served by uWSGI and by serve.py alike.

Every request burns BURN_MS (default 20) milliseconds of this thread's CPU time in pure
Python, then answers "ok". Burning CPU time (not wall time) keeps the work per request the
same however the scheduler shares the cores: a worker that waits for a CPU takes longer in
wall time, as a real CPU-bound handler would.
"""
import os
import time

BURN_S = float(os.environ.get("BURN_MS", "20")) / 1000.0


def burn(seconds):
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        for i in range(500):
            x += i * i
    return x


def application(environ, start_response):
    burn(BURN_S)
    body = b"ok\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
