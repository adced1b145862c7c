"""deploy/nginx.conf in front of gunicorn, with the real nginx (Debian package nginx; `make test` installs it).

The module starts gunicorn the way the Procfile and the Dockerfile do (gunicorn.conf.py, 2 workers, a tiny
random-weight model) and nginx with the repository's configuration, its ports and paths rewritten into a temporary
folder, and checks what the configuration is for: clients that send slowly hold no gunicorn thread, a refused request
(429, 405) leaves the client's keep-alive connection usable, a restarted worker gets requests again, and nginx's own
limits (upload size, connections per address) match the app's.

Client addresses: Linux routes all of 127.0.0.0/8 to loopback, so each test's clients bind their own source address
(127.0.0.x) and nginx, the app's ProxyFix and its per-address rate limit see them as different clients.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, make_image
from dermsight.web.app import DEFAULTS

CONFIG = ROOT / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
WORKERS = 2
RATE_LIMIT = "2/60"  # per worker process (memory storage): 2 predictions a minute per client address and worker
SLOW_CLIENTS = 20
# gunicorn's access log with the worker's pid ("<1234>"), to see which worker answered each request.
ACCESS_LOG = "%(p)s %(h)s %(m)s %(U)s %(s)s"
ACCESS_LINE = re.compile(r"^<(\d+)> (\S+) (\S+) (\S+) (\d{3})$")


def _directive(name: str) -> str:
    """The value of a directive that deploy/nginx.conf sets exactly once (comments left out)."""
    text = re.sub(r"#[^\n]*", "", CONFIG.read_text())
    values = re.findall(rf"^\s*{name}\s+([^;{{}}\n]*);", text, re.MULTILINE)
    assert len(values) == 1, f"{name}: {values}"
    return values[0].strip()


def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", size).groups()
    return int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit.lower()]


def _seconds(value: str) -> int:
    return int(re.fullmatch(r"(\d+)s?", value).group(1))


# ------------------------------------------------------------------------------- the configuration, without nginx


def test_config_matches_the_app_and_buffers_whole_requests():
    limit = DEFAULTS["MAX_CONTENT_LENGTH"]
    assert _bytes(_directive("client_max_body_size")) == limit  # nginx refuses what the app would refuse anyway
    assert _bytes(_directive("client_body_buffer_size")) >= limit  # whole uploads in memory, never in a temp file
    assert _directive("proxy_request_buffering") == "on"
    assert _directive("proxy_max_temp_file_size") == "0"
    for timeout in ("client_header_timeout", "client_body_timeout", "send_timeout", "keepalive_timeout"):
        assert _seconds(_directive(timeout)) <= 15, timeout
    assert _directive("proxy_http_version") == "1.1"
    assert _directive("proxy_set_header Connection") == '"close"'
    assert "keepalive " not in re.sub(r"#[^\n]*", "", CONFIG.read_text()).split("upstream dermsight")[1].split("}")[0]
    assert _directive("proxy_set_header X-Forwarded-For") == "$proxy_add_x_forwarded_for"
    assert _directive("proxy_set_header X-Forwarded-Proto") == "$scheme"
    assert _directive("server") == "127.0.0.1:8000"  # gunicorn's default port, on loopback
    assert 6 <= int(_directive("limit_conn").split()[1]) <= 64


# ------------------------------------------------------------------------------------------------ the running pair


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int, path: str = "/healthz", timeout: float = 2) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def _stop(proc: subprocess.Popen, sig: int) -> None:
    """Stop a server started in its own session, and anything it left in that session."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its workers, should any have outlived it


@dataclass
class Stack:
    tmp: Path
    gunicorn: subprocess.Popen
    gunicorn_port: int
    nginx_port: int
    png: bytes

    def access_lines(self) -> list[tuple[int, str, str, str, int]]:
        """gunicorn's access log: (worker pid, client address, method, path, status) per request."""
        lines = (self.tmp / "gunicorn.out").read_text().splitlines()
        return [(int(m[1]), m[2], m[3], m[4], int(m[5])) for m in map(ACCESS_LINE.match, lines) if m]

    def booted_workers(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", self.errors())]

    def errors(self) -> str:
        return (self.tmp / "gunicorn.err").read_text()


def _start_gunicorn(tmp: Path, port: int, model: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DERMSIGHT_", "GUNICORN_"))}
    env.update(
        PORT=str(port),
        WEB_CONCURRENCY=str(WORKERS),
        GUNICORN_HOST="127.0.0.1",
        GUNICORN_CMD_ARGS=f"--access-logformat '{ACCESS_LOG}'",
        DERMSIGHT_MODEL=str(model),
        DERMSIGHT_BACKEND="torch",  # no ONNX export of the tiny model
        DERMSIGHT_THREADS="1",
        DERMSIGHT_CACHE=str(tmp / "cache"),
        DERMSIGHT_SECRET_KEY="test-only",
        DERMSIGHT_RATE_LIMIT=RATE_LIMIT,
        DERMSIGHT_RATE_LIMIT_STORAGE="memory://",
        DERMSIGHT_PROXY_COUNT="1",
    )
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "dermsight.web:create_app()"]
    with open(tmp / "gunicorn.out", "wb") as out, open(tmp / "gunicorn.err", "wb") as err:
        return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=err, start_new_session=True)


def _nginx_config(tmp: Path, port: int, upstream_port: int) -> Path:
    """deploy/nginx.conf listening on ``port``, passing to gunicorn on ``upstream_port``, writing only into tmp."""
    text = CONFIG.read_text()
    temp_paths = "".join(
        f"    {kind}_temp_path {tmp / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    for old, new in [
        ("listen 80 default_server;", f"listen 127.0.0.1:{port} default_server;"),
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};"),
        ("\nhttp {\n", "\nhttp {\n" + temp_paths),
    ]:
        assert text.count(old) == 1, f"deploy/nginx.conf no longer has {old!r} once: update this test"
        text = text.replace(old, new)
    # Workers as this user, who owns the temporary folder (as root the user directive is obeyed, otherwise ignored).
    assert text.count("\nuser www-data;") == 1
    text = text.replace("\nuser www-data;", "\nuser root;" if os.geteuid() == 0 else "\n")
    assert "/var/log/nginx/" in text
    text = text.replace("/var/log/nginx/", f"{tmp}/")
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


def _start_nginx(tmp: Path, config: Path) -> subprocess.Popen:
    version = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr
    numbers = tuple(int(n) for n in re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version).groups())
    main = f"daemon off; pid {tmp / 'nginx.pid'}; error_log {tmp / 'nginx.error.log'} info;"
    cmd = [NGINX, "-p", str(tmp), "-c", str(config), "-g", main]
    if numbers >= (1, 19, 5):
        cmd[1:1] = ["-e", str(tmp / "nginx.startup.log")]  # not the system's error log, even before the config
    with open(tmp / "nginx.out", "wb") as out:
        return subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _tiny_model(path: Path) -> Path:
    import torch

    from dermsight.models import ModelMeta, WeightsInfo, create_model, save_model

    torch.manual_seed(0)
    model, _ = create_model("tf_efficientnet_lite0", 7, weights="none")
    weights = WeightsInfo("none", "random", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 64)
    return save_model(path, model, ModelMeta.new("tf_efficientnet_lite0", "ham7", weights, input_size=64))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx; `make test` does)")
    if not sys.platform.startswith("linux"):
        pytest.skip("the clients bind source addresses in 127.0.0.0/8, which only Linux routes to loopback")
    pytest.importorskip("gunicorn", reason="gunicorn is not installed")
    tmp = tmp_path_factory.mktemp("proxy")
    png = make_image(tmp / "lesion.png", size=(160, 120)).read_bytes()
    gport, nport = _free_port(), _free_port()
    gunicorn = _start_gunicorn(tmp, gport, _tiny_model(tmp / "tiny.safetensors"))
    nginx = None
    try:
        stack = Stack(tmp, gunicorn, gport, nport, png)
        deadline = time.monotonic() + 180
        # Ready: every worker loaded its model and passed the self-test (/healthz answers per worker).
        while stack.errors().count("model loaded:") < WORKERS or _answers(gport) != 200:
            assert gunicorn.poll() is None, f"gunicorn exited:\n{stack.errors()[-3000:]}"
            assert time.monotonic() < deadline, f"gunicorn not ready:\n{stack.errors()[-3000:]}"
            time.sleep(0.2)
        nginx = _start_nginx(tmp, _nginx_config(tmp, nport, gport))
        deadline = time.monotonic() + 30
        while _answers(nport) != 200:
            logs = "".join(p.read_text() for p in [*sorted(tmp.glob("nginx*.log")), tmp / "nginx.out"] if p.exists())
            assert nginx.poll() is None, f"nginx exited:\n{logs[-3000:]}"
            assert time.monotonic() < deadline, f"nginx does not answer:\n{logs[-3000:]}"
            time.sleep(0.1)
        yield stack
    finally:
        if nginx is not None:
            _stop(nginx, signal.SIGTERM)  # fast shutdown: open client connections are closed
        _stop(gunicorn, signal.SIGINT)  # quick shutdown (SIGTERM would wait for open keep-alive connections)


def _connection(port: int, client: str, timeout: float = 5) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(client, 0))


def _multipart(png: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="lesion.png"\r\n'
    body = (head + "Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _request(conn: http.client.HTTPConnection, method: str, path: str, body=None, headers=None):
    conn.request(method, path, body, headers or {})
    response = conn.getresponse()
    response.read()
    return response


def _timed(
    port: int, client: str, method: str, path: str, png: bytes | None = None, timeout: float = 5
) -> tuple[int | str, float]:
    """(status or the exception's name, seconds) of one request on a new connection."""
    body, headers = _multipart(png) if png else (None, None)
    start = time.monotonic()
    try:
        status: int | str = _request(_connection(port, client, timeout), method, path, body, headers).status
    except OSError as e:
        status = type(e).__name__
    return status, time.monotonic() - start


class SlowClients:
    """Connections that send a request line and then one byte of a header a second, and never finish."""

    def __init__(self, port: int, count: int, client: str):
        self.socks = [socket.create_connection(("127.0.0.1", port), source_address=(client, 0)) for _ in range(count)]
        self.opened = time.monotonic()
        self.closed_after: dict[int, float] = {}  # which connections the server closed, after how many seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)

    def _trickle(self) -> None:
        for sock in self.socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: dermsight\r\n")
        while not self._stop.wait(1.0):
            for i, sock in enumerate(self.socks):
                if i not in self.closed_after:
                    try:
                        sock.sendall(b"X")
                    except OSError:
                        self.closed_after[i] = time.monotonic() - self.opened

    def __enter__(self) -> SlowClients:
        self._thread.start()
        time.sleep(1.5)  # every connection has sent its request line and a byte of headers
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.socks:
            sock.close()


@pytest.mark.slow
def test_slow_clients_hold_no_gunicorn_thread_behind_nginx(stack):
    header_timeout = _seconds(_directive("client_header_timeout"))
    with SlowClients(stack.nginx_port, SLOW_CLIENTS, "127.0.0.2") as slow:
        timings = []
        for i in range(3):
            timings.append(_timed(stack.nginx_port, "127.0.0.3", "GET", "/healthz"))
            # one prediction per client address: the rate limit (2 a minute per worker) stays out of the way
            timings.append(_timed(stack.nginx_port, f"127.0.0.{30 + i}", "POST", "/api/v1/predict", stack.png))
        assert [status for status, _ in timings] == [200] * 6, timings
        assert max(seconds for _, seconds in timings) < 5, timings
        assert not slow.closed_after, "the slow clients were still connected while the requests above were answered"
        # nginx drops them once their headers took client_header_timeout in all
        while len(slow.closed_after) < SLOW_CLIENTS and time.monotonic() - slow.opened < header_timeout + 10:
            time.sleep(0.5)
        assert len(slow.closed_after) == SLOW_CLIENTS
        assert max(slow.closed_after.values()) < header_timeout + 5, slow.closed_after


@pytest.mark.slow
def test_without_nginx_the_same_slow_clients_block_gunicorn(stack):
    # Each slow connection holds one of gunicorn's threads (2 workers x 4) for as long as it keeps sending, and a
    # request accepted by a worker whose threads are all held waits behind them. Which worker accepts a connection is
    # up to the kernel: one may take nearly all the slow connections and leave the other free, so rounds with more
    # of them follow until a request times out.
    checks: list[tuple[int | str, float]] = []
    for count in (SLOW_CLIENTS, 2 * SLOW_CLIENTS, 3 * SLOW_CLIENTS):
        with SlowClients(stack.gunicorn_port, count, "127.0.0.2"):
            for _ in range(8):
                checks.append(_timed(stack.gunicorn_port, "127.0.0.3", "GET", "/healthz", timeout=2))
                if checks[-1][0] == "TimeoutError":
                    break
        if checks[-1][0] == "TimeoutError":
            break
    assert any(status == "TimeoutError" for status, _ in checks), checks
    # and gunicorn answers again once they are gone
    deadline = time.monotonic() + 20
    while _answers(stack.gunicorn_port) != 200:
        assert time.monotonic() < deadline, "gunicorn did not recover after the slow clients left"
        time.sleep(0.2)


@pytest.mark.slow
def test_after_a_429_the_keepalive_connection_keeps_working(stack):
    body, headers = _multipart(stack.png)
    conn = _connection(stack.nginx_port, "127.0.0.4")
    statuses = []
    for _ in range(2 * WORKERS + 1):  # each worker counts its own 2 a minute
        response = _request(conn, "POST", "/api/v1/predict", body, headers)
        statuses.append(response.status)
        if len(statuses) == 1:
            local = conn.sock.getsockname()
        if response.status == 429:
            break
    assert statuses[-1] == 429 and statuses[:-1] == [200] * (len(statuses) - 1), statuses
    assert response.getheader("Retry-After") and not response.will_close
    # the next requests on the same connection are answered (straight to gunicorn, the connection was dropped and
    # they failed with RemoteDisconnected)
    assert _request(conn, "POST", "/api/v1/predict", body, headers).status in (200, 429)
    assert _request(conn, "GET", "/healthz").status == 200
    assert conn.sock.getsockname() == local, "http.client reconnected: the connection was closed"
    conn.close()
    # counted for this client's address, not nginx's: another client may still predict
    assert _timed(stack.nginx_port, "127.0.0.5", "POST", "/api/v1/predict", stack.png)[0] == 200
    time.sleep(0.3)  # gunicorn writes its access log line just after the answer
    seen = {(client, status) for _, client, method, path, status in stack.access_lines() if path == "/api/v1/predict"}
    assert {("127.0.0.4", 429), ("127.0.0.5", 200)} <= seen


@pytest.mark.slow
def test_after_a_405_the_keepalive_connection_keeps_working(stack):
    body, headers = _multipart(stack.png)
    conn = _connection(stack.nginx_port, "127.0.0.6")
    response = _request(conn, "POST", "/healthz", body, headers)
    assert response.status == 405 and response.getheader("Allow") and not response.will_close
    local = conn.sock.getsockname()
    assert _request(conn, "POST", "/healthz", body, headers).status == 405
    assert _request(conn, "GET", "/healthz").status == 200
    assert conn.sock.getsockname() == local, "http.client reconnected: the connection was closed"
    conn.close()


@pytest.mark.slow
def test_uploads_over_the_apps_limit_stop_at_nginx(stack):
    limit = DEFAULTS["MAX_CONTENT_LENGTH"]
    headers = {"Content-Type": "application/octet-stream"}
    conn = _connection(stack.nginx_port, "127.0.0.7", 30)
    response = _request(conn, "POST", "/api/v1/predict", b"x" * (limit + 1), headers)
    assert response.status == 413 and response.getheader("Server") == "nginx"
    # at the limit the request reaches the app (which finds no photo in it)
    conn = _connection(stack.nginx_port, "127.0.0.7", 30)
    conn.request("POST", "/api/v1/predict", b"x" * limit, headers)
    response = conn.getresponse()
    assert response.status == 400 and b'"no_image"' in response.read()


@pytest.mark.slow
def test_connections_per_client_address_are_limited(stack):
    limit = int(_directive("limit_conn").split()[1])
    uploads = [socket.create_connection(("127.0.0.1", stack.nginx_port), source_address=("127.0.0.8", 0))]
    try:
        uploads += [
            socket.create_connection(("127.0.0.1", stack.nginx_port), source_address=("127.0.0.8", 0))
            for _ in range(limit - 1)
        ]
        for sock in uploads:  # uploads in progress: headers sent, the body not yet
            sock.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: dermsight\r\nContent-Length: 1000\r\n\r\nab")
        time.sleep(0.5)
        assert _timed(stack.nginx_port, "127.0.0.8", "GET", "/healthz")[0] == 429
        assert _timed(stack.nginx_port, "127.0.0.9", "GET", "/healthz")[0] == 200
    finally:
        for sock in uploads:
            sock.close()


@pytest.mark.slow
def test_a_restarted_worker_gets_requests_again(stack):
    before = stack.booted_workers()
    os.kill(before[-1], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while len(stack.booted_workers()) == len(before):
        assert time.monotonic() < deadline, "gunicorn did not start a new worker"
        time.sleep(0.1)
    new = stack.booted_workers()[-1]
    conn = _connection(stack.nginx_port, "127.0.0.10")
    statuses: Counter[int] = Counter()
    served: Counter[int] = Counter()
    while served[new] < 3 and time.monotonic() < deadline:
        for _ in range(20):  # one client, one keep-alive connection
            statuses[_request(conn, "GET", "/healthz").status] += 1
            time.sleep(0.02)
        time.sleep(0.3)
        lines = stack.access_lines()
        served = Counter(pid for pid, client, _, _, status in lines if client == "127.0.0.10" and status == 200)
    conn.close()
    # Every request was answered: 200, or 503 from the new worker while it loaded its model.
    assert set(statuses) <= {200, 503} and statuses[200], statuses
    assert served[new] >= 3 and len(served) == WORKERS, served
