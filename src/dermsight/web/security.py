"""Safety of the web app: security headers, CSRF tokens, a per-client rate limit and in-memory uploads.

Headers, CSRF and uploads are small and hand-written (the form is the only cookie-bearing POST). The rate limit uses
Flask-Limiter's storage, so that with Redis it is one limit across all workers and servers; it protects one expensive
operation and is counted in the views, after the form's CSRF check.
"""

from __future__ import annotations

import hmac
import importlib.util
import io
import logging
import math
import secrets
import time
import urllib.parse

from flask import Request, session
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits import RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import MemoryStorage

log = logging.getLogger("dermsight.web")


class RequestRefused(Exception):
    """A request the app refuses (bad upload, CSRF, rate limit), with an HTTP status and a message fit to show the
    user; ``kind`` is a stable code for API clients, ``tips`` says whether photo tips help."""

    def __init__(self, status: int, message: str, kind: str, tips: bool = True, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.tips, self.retry_after = status, message, kind, tips, retry_after


CSRF_FIELD = "csrf_token"
_CSRF_SESSION_KEY = "csrf"

# img-src allows data: (the photo and Grad-CAM overlay are embedded in the result page, never stored) and blob: (the
# upload preview, made in the browser from the chosen file). No inline script or style anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # File inputs with capture= open the phone's camera app; no page needs camera access through the browser.
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def security_headers(response, hsts: bool = False):
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if hsts:
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
    return response


# ---------------------------------------------------------------------------------------------------------------- CSRF


def csrf_token() -> str:
    """The session's CSRF token, created on first use (the session cookie is signed with the app's secret key)."""
    token = session.get(_CSRF_SESSION_KEY)
    if not token:
        token = secrets.token_urlsafe(32)
        session[_CSRF_SESSION_KEY] = token
    return token


def csrf_valid(submitted: str | None) -> bool:
    expected = session.get(_CSRF_SESSION_KEY)
    return bool(expected and submitted) and hmac.compare_digest(str(expected), str(submitted))


def check_csrf(form) -> None:
    if not csrf_valid(form.get(CSRF_FIELD)):
        raise RequestRefused(
            400,
            "Your session has expired or this form was not sent from dermsight. Please reload the page and try "
            "again (cookies must be enabled for this site).",
            "csrf_failed",
            tips=False,
        )


# ---------------------------------------------------------------------------------------------------------- rate limit


# Storage for the rate limit's counts: memory (each worker process counts alone) or one Redis server shared by every
# worker of every server. Only schemes whose storage keeps a moving window and that this module knows how to time out.
RATE_LIMIT_STORAGES = ("memory", "redis", "rediss", "redis+unix")
# Seconds a request may wait for Redis: connecting and each command. An unreachable Redis costs a request this once.
REDIS_TIMEOUT_S = 0.5
# After Redis failed, requests go through uncounted for this long before it is asked again, so that an outage costs
# one request a timeout now and then rather than every request.
STORAGE_RETRY_S = 5.0


def check_rate_limit_storage(uri: str) -> str:
    """``uri`` if it names a storage the rate limit can use (``memory://``, ``redis://host:port[/db]``, ...), else
    ValueError saying what would."""
    scheme = uri.strip().partition("://")[0].lower() if "://" in uri else ""
    if scheme not in RATE_LIMIT_STORAGES:
        raise ValueError(f"expected memory:// or redis://HOST:PORT (also rediss://, redis+unix://), got {uri!r}")
    if scheme == "memory":
        return uri.strip()
    try:
        urllib.parse.urlparse(uri.strip()).port  # noqa: B018  # "redis://host:abc" fails here, not in every worker
    except ValueError as e:
        raise ValueError(f"{uri!r}: {e}") from None
    if importlib.util.find_spec("redis") is None:
        raise ValueError(f"{uri!r} needs the redis package: pip install 'dermsight[redis]'")
    return uri.strip()


class RateLimit:
    """At most ``limit`` requests per ``window`` seconds per client IP, as a moving window kept by Flask-Limiter's
    storage (the ``limits`` library) at ``storage_uri``.

    With ``memory://`` the counts live in each worker process: with N gunicorn workers a client gets up to N times
    the limit, and several servers each count alone. With ``redis://`` every worker of every server that names the
    same Redis counts together. The window is whole seconds (a fraction is rounded up).
    """

    def __init__(self, app, limit: int, window: float, storage_uri: str = "memory://") -> None:
        self.limit, self.window = limit, max(1, math.ceil(window)) if window > 0 else 0
        self.limiter: Limiter | None = None
        self._down_until = 0.0  # time.monotonic() before which the storage is not asked again
        if not self.enabled:
            return
        storage_uri = check_rate_limit_storage(storage_uri)
        options: dict = {}
        if not storage_uri.startswith("memory"):
            options = {"socket_connect_timeout": REDIS_TIMEOUT_S, "socket_timeout": REDIS_TIMEOUT_S}
        # Flask-Limiter holds the storage and the strategy. No route is decorated and there are no default limits:
        # `enforce_rate_limit` counts in the view itself, so the form's CSRF check comes before the count.
        self.limiter = Limiter(
            key_func=get_remote_address,
            app=app,
            storage_uri=storage_uri,
            storage_options={"wrap_exceptions": True, **options},
            strategy="moving-window",
            default_limits=[],
            headers_enabled=False,
        )
        self.item = RateLimitItemPerSecond(limit, self.window)
        storage = self.limiter.storage
        # The moving window's calls into storage are not wrapped in StorageError by `limits`: catch the storage's own
        # errors too (redis.RedisError; for memory:// only StorageError, so a bug is never mistaken for an outage).
        own = () if isinstance(storage, MemoryStorage) else storage.base_exceptions
        self._storage_errors: tuple[type[BaseException], ...] = (
            StorageError,
            *(own if isinstance(own, tuple) else (own,)),
        )

    @property
    def enabled(self) -> bool:
        return self.limit > 0 and self.window > 0

    def hit(self, key: str) -> float:
        """Count one request; returns 0 when allowed, else the seconds until the client may try again.

        When the storage cannot be reached (Redis down), the request is allowed and a warning logged: caught here
        rather than with Flask-Limiter's ``swallow_errors``, which only covers the limits it checks itself."""
        if self.limiter is None:
            return 0.0
        if time.monotonic() < self._down_until:
            return 0.0
        strategy, ids = self.limiter.limiter, ("dermsight-predict", key)
        try:
            if strategy.hit(self.item, *ids):
                was_down, self._down_until = self._down_until, 0.0
                if was_down:
                    log.info("rate limit storage reachable again: requests are counted again")
                return 0.0
            reset_at, _remaining = strategy.get_window_stats(self.item, *ids)
        except self._storage_errors as e:
            if not self._down_until:
                cause = getattr(e, "storage_error", e)
                log.warning(
                    "rate limit storage unreachable (%s: %s): requests are let through uncounted until it is back",
                    type(cause).__name__,
                    cause,
                )
            self._down_until = time.monotonic() + STORAGE_RETRY_S
            return 0.0
        return max(reset_at - time.time(), 0.001)

    def reset(self) -> None:
        if self.limiter is not None:
            self.limiter.reset()


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def parse_rate_limit(text: str) -> tuple[int, float]:
    """``"30/60"`` -> 30 requests per 60 seconds; ``"0"`` or ``"off"`` disables."""
    text = text.strip().lower()
    if text in ("", "0", "off", "none"):
        return 0, 0.0
    count, _, window = text.partition("/")
    try:
        limit, seconds = int(count), float(window or 60)
    except ValueError:
        raise ValueError(f"rate limit {text!r}: expected REQUESTS/SECONDS, e.g. 30/60, or off") from None
    if limit < 0 or seconds <= 0:
        raise ValueError(f"rate limit {text!r}: expected a positive number of requests and seconds")
    return limit, seconds


# ------------------------------------------------------------------------------------------------------------- uploads


class InMemoryRequest(Request):
    """Keeps uploaded files in memory: Werkzeug's default spools any file over 500 KB to a temporary file on disk.

    Users' photos must never touch the disk; MAX_CONTENT_LENGTH bounds the memory this takes.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


# Magic numbers of the formats `dermsight.data.images` decodes. The type is judged from the bytes, never from the
# file name or the Content-Type the client sent.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_image_type(data: bytes) -> str | None:
    """The image format of ``data`` from its first bytes ("JPEG", "PNG", "WEBP", "BMP", "TIFF"), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def enforce_rate_limit() -> None:
    """Count this request against its client's budget; raise a 429 `RequestRefused` past it."""
    from flask import current_app

    limiter: RateLimit = current_app.extensions["dermsight.ratelimit"]
    wait = limiter.hit(get_remote_address())
    if wait:
        raise RequestRefused(
            429,
            f"Too many photos in a short time. Please wait {retry_after_header(wait)} seconds and try again.",
            "rate_limited",
            tips=False,
            retry_after=retry_after_header(wait),
        )
