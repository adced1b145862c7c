"""The prediction rate limit: counted after the form's CSRF check, per client IP, in memory (each worker process alone)
or in one Redis shared by every worker and server; a Redis that is down never turns a request into an error.

The Redis tests start a real ``redis-server`` (Debian package redis-server; `make test` installs it) on a free port.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_web import FakePredictor, _form_post, _jpeg

from dermsight.web import create_app, security
from dermsight.web.app import config_from_env
from dermsight.web.security import RateLimit, check_rate_limit_storage, parse_rate_limit

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not on PATH (apt-get install redis-server; `make test` does)"
)


def _app(limit: str = "3/60", storage: str = "memory://", fake: FakePredictor | None = None):
    config = {"TESTING": True, "SECRET_KEY": "test-only", "RATE_LIMIT": limit, "RATE_LIMIT_STORAGE": storage}
    return create_app(fake or FakePredictor(), config)


def _predict(client, ip: str = "203.0.113.7"):
    return client.post(
        "/api/v1/predict",
        data={"image": (io.BytesIO(_jpeg()), "photo.jpg")},
        content_type="multipart/form-data",
        environ_overrides={"REMOTE_ADDR": ip},
    )


def _token_for(client, ip: str = "203.0.113.7") -> str:
    page = client.get("/", environ_overrides={"REMOTE_ADDR": ip}).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def _statuses(clients, ip: str = "203.0.113.7") -> list[int]:
    return [_predict(c, ip).status_code for c in clients]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int, workdir: Path) -> subprocess.Popen:
    """A throw-away redis-server on 127.0.0.1:``port`` that writes nothing to disk; ready when it returns."""
    import redis

    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
        finally:
            client.close()


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[str]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server; `make test` does)")
    port = _free_port()
    proc = _start_redis(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


@pytest.fixture
def redis_url(redis_server) -> str:
    import redis

    with redis.Redis.from_url(redis_server) as r:
        r.flushdb()  # every test starts with no counts
    return redis_server


# ------------------------------------------------------------------------------------------------------------- memory


def test_past_the_limit_a_client_gets_429_with_retry_after():
    fake = FakePredictor()
    client = _app("3/60", fake=fake).test_client()
    assert _statuses([client] * 3) == [200, 200, 200]
    r = _predict(client)
    assert r.status_code == 429
    assert r.json == {
        "status": "error",
        "error": "rate_limited",
        "message": f"Too many photos in a short time. Please wait {r.headers['Retry-After']} seconds and try again.",
    }
    assert 59 <= int(r.headers["Retry-After"]) <= 60  # whole seconds until the oldest request leaves the window
    assert fake.calls == 3  # the refused request never reached the model
    # the web form shares the client's budget, and is refused with a page
    page = client.post(
        "/analyse",
        data={"csrf_token": _token_for(client), "image": (io.BytesIO(_jpeg()), "p.jpg")},
        content_type="multipart/form-data",
        environ_overrides={"REMOTE_ADDR": "203.0.113.7"},
    )
    assert page.status_code == 429 and "Please slow down" in page.get_data(as_text=True)
    assert page.headers["Retry-After"]


def test_another_client_is_not_affected():
    client = _app("2/60").test_client()
    assert _statuses([client] * 3, ip="198.51.100.1") == [200, 200, 429]
    assert _statuses([client] * 2, ip="198.51.100.2") == [200, 200]


def test_a_post_failing_csrf_is_refused_as_such_and_uses_no_budget():
    fake = FakePredictor()
    client = _app("2/60", fake=fake).test_client()
    for _ in range(4):  # another site's page posting in the visitor's browser, without the form's token
        r = _form_post(client, _jpeg(), token="forged")
        assert r.status_code == 400 and "expired" in r.get_data(as_text=True)
        assert "Retry-After" not in r.headers
    assert [_form_post(client, _jpeg()).status_code for _ in range(3)] == [200, 200, 429]
    assert fake.calls == 2


def test_the_window_moves():
    client = _app("1/1").test_client()
    assert _statuses([client] * 2) == [200, 429]
    time.sleep(1.05)  # the first request has left the one-second window
    assert _statuses([client]) == [200]


def test_memory_storage_counts_each_worker_alone():
    # Two apps are two gunicorn workers: with memory:// each keeps its own counts, so a client whose requests are
    # spread over them gets up to twice the limit. This is what DERMSIGHT_RATE_LIMIT_STORAGE=redis://... fixes.
    a, b = _app("2/60").test_client(), _app("2/60").test_client()
    assert _statuses([a, b, a, b]) == [200, 200, 200, 200]
    assert _statuses([a, b]) == [429, 429]


def test_off_disables_the_limit():
    app = _app("off")
    assert app.extensions["dermsight.ratelimit"].limiter is None
    assert set(_statuses([app.test_client()] * 40)) == {200}


def test_settings():
    assert parse_rate_limit("30/60") == (30, 60.0) and parse_rate_limit("off") == (0, 0.0)
    assert parse_rate_limit("0") == (0, 0.0)
    with pytest.raises(ValueError, match="REQUESTS/SECONDS"):
        parse_rate_limit("lots")
    assert config_from_env({"DERMSIGHT_RATE_LIMIT_STORAGE": "redis://cache:6379/2"}) == {
        "RATE_LIMIT_STORAGE": "redis://cache:6379/2"
    }
    assert check_rate_limit_storage(" memory:// ") == "memory://"
    for wrong in ("memcached://x:11211", "cache:6379", ""):
        with pytest.raises(ValueError, match="expected memory:// or redis://HOST:PORT"):
            check_rate_limit_storage(wrong)
    with pytest.raises(ValueError, match="DERMSIGHT_RATE_LIMIT_STORAGE"):
        config_from_env({"DERMSIGHT_RATE_LIMIT_STORAGE": "localhost:6379"})
    with pytest.raises(ValueError, match="Port could not be cast"):
        check_rate_limit_storage("redis://cache:port")
    # the storages count in whole seconds: a fraction of a second is rounded up
    rl = _app("5/0.5").extensions["dermsight.ratelimit"]
    assert isinstance(rl, RateLimit) and (rl.limit, rl.window) == (5, 1)


# -------------------------------------------------------------------------------------------------------------- redis


@needs_redis
def test_redis_storage_counts_all_workers_together(redis_url):
    a, b = _app("3/60", redis_url).test_client(), _app("3/60", redis_url).test_client()
    assert _statuses([a, b, a]) == [200, 200, 200]
    refused = [_predict(b), _predict(a)]  # the limit, not twice the limit
    assert [r.status_code for r in refused] == [429, 429]
    assert all(r.json["error"] == "rate_limited" and 59 <= int(r.headers["Retry-After"]) <= 60 for r in refused)
    assert _statuses([a, b], ip="198.51.100.9") == [200, 200]  # another client has its own budget


@needs_redis
def test_redis_storage_is_shared_with_the_web_form_after_csrf(redis_url):
    a, b = _app("2/60", redis_url).test_client(), _app("2/60", redis_url).test_client()
    assert _form_post(a, _jpeg(), token="forged").status_code == 400  # not counted
    assert [_form_post(a, _jpeg()).status_code, _form_post(b, _jpeg()).status_code] == [200, 200]
    assert _form_post(a, _jpeg()).status_code == 429


def test_redis_down_lets_requests_through_with_a_warning(caplog):
    port = _free_port()  # nothing listens here
    app = _app("1/60", f"redis://127.0.0.1:{port}")  # starts although Redis is down
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="dermsight.web"):
        responses = [_predict(client) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]  # uncounted, never a 500
    warnings = [r.getMessage() for r in caplog.records if "rate limit storage unreachable" in r.getMessage()]
    assert len(warnings) == 1 and "ConnectionError" in warnings[0]  # once per outage, not once per request
    assert "Traceback" not in caplog.text


@needs_redis
def test_counting_resumes_when_redis_is_back(tmp_path, monkeypatch):
    monkeypatch.setattr(security, "STORAGE_RETRY_S", 0.0)  # ask the storage again at once
    port = _free_port()
    client = _app("1/60", f"redis://127.0.0.1:{port}").test_client()
    assert _statuses([client] * 2) == [200, 200]  # down: let through
    proc = _start_redis(port, tmp_path)
    try:
        assert _statuses([client] * 2) == [200, 429]
    finally:
        _stop(proc)
