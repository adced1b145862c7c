"""Safety of the web app: security headers, CSRF tokens, a per-client rate limit and in-memory uploads.

Everything here is small and hand-written on purpose (no extra dependencies): the form is the only cookie-bearing
POST, and the rate limit only has to protect one expensive operation.
"""

from __future__ import annotations

import hmac
import io
import math
import secrets
import threading
import time
from collections import OrderedDict, deque

from flask import Request, session


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


class RateLimiter:
    """At most ``limit`` requests per ``window`` seconds per key (client IP), as a sliding window log.

    In memory, so per worker process: with N gunicorn workers a client gets up to N times the limit, and several
    servers each count alone. That is enough to stop one client from monopolising a small server; a large
    deployment should also limit at its proxy. Memory is bounded: at most ``max_keys`` clients are tracked, the
    least recently seen forgotten first.
    """

    def __init__(self, limit: int, window: float, max_keys: int = 10_000, clock=time.monotonic):
        self.limit, self.window, self.max_keys, self.clock = limit, float(window), max_keys, clock
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.limit > 0 and self.window > 0

    def hit(self, key: str) -> float:
        """Count one request; returns 0 when allowed, else the seconds until the client may try again."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        with self._lock:
            hits = self._hits.pop(key, None) or deque()
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            self._hits[key] = hits  # re-inserted last: most recently seen
            if len(hits) >= self.limit:
                return max(hits[0] + self.window - now, 0.001)
            hits.append(now)
            while len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
            return 0.0

    def reset(self) -> None:
        with self._lock:
            self._hits.clear()


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
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif")


def sniff_image_type(data: bytes) -> str | None:
    """The image format of ``data`` from its first bytes ("JPEG", "PNG", "WEBP", "BMP", "TIFF"), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def describe_unsupported(data: bytes) -> str:
    """A short, friendly guess at what an unsupported upload is, for the 415 message."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "a HEIC/HEIF or AVIF photo (HEIC is the iPhone camera's default format)"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF"
    if data.startswith(b"%PDF"):
        return "a PDF document"
    if data.startswith(b"PK\x03\x04"):
        return "a ZIP or office document"
    if data[4:8] == b"ftyp":
        return "a video"
    head = data[:512]
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return "in a format we do not recognise"


def enforce_rate_limit() -> None:
    """Count this request against its client's budget; raise a 429 `UploadProblem` past it."""
    from flask import current_app, request

    limiter: RateLimiter = current_app.extensions["dermsight.ratelimit"]
    wait = limiter.hit(request.remote_addr or "unknown")
    if wait:
        raise RequestRefused(
            429,
            f"Too many photos in a short time. Please wait {retry_after_header(wait)} seconds and try again.",
            "rate_limited",
            tips=False,
            retry_after=retry_after_header(wait),
        )
