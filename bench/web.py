"""Load test of the JSON API: requests per second and p50/p99 latency of POST /api/v1/predict with real photos at
1, 4 and 16 concurrent clients, against `dermsight serve` (gunicorn) on loopback.

    .venv/bin/python bench/web.py [--workers N] [--clients 1 4 16] [--requests 64] [--images DIR] [--url URL]
                                  [--slow N]

Starts its own server (rate limit off, default model unless --model) on a free port, warms every worker up, then
runs the levels one after the other; with --url it loads an already running server instead. Prints a Markdown table;
any error (a non-200 answer or a refused connection) is counted and makes the exit status 1. --slow N also holds N
slow connections open for the whole measurement, each sending one header line a second and never finishing its
request (the way a slow or stalled client, or a slowloris attack, ties up a server): behind a buffering proxy
(deploy/nginx.conf, pass its address with --url) they should cost nothing; straight to gunicorn they take its
workers' connection threads away.

The clients run in this process (threads with keep-alive connections); on a small machine they take some CPU from
the server, so the figures are a floor.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "ham10000_fullres_sample" / "images"


def multipart(data: bytes, filename: str = "photo.jpg") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive connection; reconnects once if the server closed it between requests."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, content_type: str) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            try:
                self.conn.request("POST", "/api/v1/predict", body, {"Content-Type": content_type})
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class SlowClients:
    """``n`` connections that send a request line, then one header line every ``every`` seconds, never ending it."""

    def __init__(self, host: str, port: int, n: int, every: float = 1.0) -> None:
        self.host, self.port, self.every = host, port, every
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._trickle, args=(i,), daemon=True) for i in range(n)]

    def _trickle(self, i: int) -> None:
        line = 0
        while not self.stop.is_set():  # reconnect when the server gives up on the connection
            try:
                with socket.create_connection((self.host, self.port), timeout=5) as s:
                    s.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: bench\r\n")
                    while not self.stop.wait(self.every):
                        line += 1
                        s.sendall(f"X-Slow-{i}-{line}: x\r\n".encode())
            except OSError:
                self.stop.wait(self.every)

    def __enter__(self) -> SlowClients:
        for t in self.threads:
            t.start()
        time.sleep(2 * self.every)  # let them connect and start trickling before the measurement
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)


def run_level(host: str, port: int, bodies: list[tuple[bytes, str]], clients: int, requests: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        client = Client(host, port)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body, ctype = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                status, payload = client.post(body, ctype)
                ok = status == 200 and json.loads(payload).get("status") in ("ok", "rejected")
                problem = None if ok else f"HTTP {status}: {payload[:120]!r}"
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if problem:
                    errors.append(problem)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(worker)
    wall = time.perf_counter() - t0
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "rps": len(latencies) / wall,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": p99 * 1000,
    }


def start_server(port: int, workers: int | None, model: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dermsight.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if workers:
        cmd += ["--workers", str(workers)]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ, DERMSIGHT_RATE_LIMIT="off")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(host: str, port: int, server: subprocess.Popen | None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}:\n{server.stderr.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on port {port} did not answer /healthz within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="load this running server (e.g. http://127.0.0.1:8000) instead of starting one")
    p.add_argument("--workers", type=int, help="gunicorn workers of the server started here (default: serve's)")
    p.add_argument("--model", help="model file (default: the bundled default model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels (default 1 4 16)")
    p.add_argument("--requests", type=int, default=64, help="requests per level (default 64)")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEG photos to upload")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--slow", type=int, default=0, help="slow connections held open meanwhile (default 0)")
    args = p.parse_args(argv)

    paths = sorted(args.images.glob("*.jpg"))[:32]
    if not paths:
        raise SystemExit(f"no .jpg images in {args.images}")
    bodies = [multipart(path.read_bytes()) for path in paths]

    server = None
    if args.url:
        parts = urlsplit(args.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
    else:
        host, port = "127.0.0.1", free_port()
        server = start_server(port, args.workers, args.model)
    try:
        wait_ready(host, port, server)
        # Warm-up: every worker loads its model (in the background after the fork) and runs its first inference.
        warm = run_level(host, port, bodies, clients=8, requests=32)
        if warm["errors"]:
            raise SystemExit(f"warm-up failed: {warm['first_error']}")
        with contextlib.ExitStack() as stack:
            if args.slow:
                stack.enter_context(SlowClients(host, port, args.slow))
            results = [run_level(host, port, bodies, c, args.requests) for c in args.clients]
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

    where = args.url or f"dermsight serve on loopback ({args.workers or 'default'} workers)"
    slow = f", {args.slow} slow connections open meanwhile" if args.slow else ""
    print(f"POST /api/v1/predict, {len(paths)} real 600x450 JPEGs, {os.cpu_count()} CPU cores, {where}{slow}\n")
    print("| clients | requests | errors | req/s | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    failed = [r for r in results if r["errors"]]
    for r in failed:
        print(f"{r['clients']} clients: {r['errors']} error(s), first: {r['first_error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
