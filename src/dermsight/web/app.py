"""The Flask application: `create_app` wires configuration, knowledge, the model and the two blueprints.

Run it with `dermsight serve` (gunicorn) or, for a platform that starts gunicorn itself,
``gunicorn -c gunicorn.conf.py "dermsight.web:create_app()"``. Settings come from the ``config`` argument, else from
``DERMSIGHT_*`` environment variables (see `config_from_env`), else the defaults below.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.middleware.proxy_fix import ProxyFix

from dermsight import __version__
from dermsight.domain.knowledge import load_knowledge
from dermsight.domain.triage import percent, sentence
from dermsight.inference.types import BACKENDS
from dermsight.web.security import (
    InMemoryRequest,
    RateLimit,
    RequestRefused,
    check_rate_limit_storage,
    csrf_token,
    parse_rate_limit,
    security_headers,
)
from dermsight.web.service import UPLOAD_FIELD, ModelService, human_size, too_large_message

log = logging.getLogger("dermsight.web")

DEFAULTS: dict[str, Any] = {
    "MODEL": None,  # path of a model file; None: $DERMSIGHT_MODEL, else the bundled default
    "BACKEND": "auto",
    "THREADS": None,  # intra-op threads per worker; `dermsight serve` sets cores // workers
    "MAX_CONTENT_LENGTH": 10 * 2**20,
    "RATE_LIMIT": "30/60",  # requests per seconds per client IP on the two predict endpoints; "off" disables
    # Where the rate limit's counts live: "memory://" (per worker process) or "redis://host:port" (shared by all
    # workers and servers that name it)
    "RATE_LIMIT_STORAGE": "memory://",
    "PROXY_COUNT": 0,  # trusted reverse proxies in front (Heroku: 1), for the client IP the rate limit uses
    "HTTPS": False,  # served over HTTPS: secure session cookie and HSTS
    "LOAD_MODEL_AT_START": False,
    "KNOWLEDGE_PATH": None,
}


def config_from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Settings from ``DERMSIGHT_*`` variables; only those set are returned. A value that cannot be one raises
    ValueError naming the variable: `dermsight serve` and gunicorn.conf.py check this once, before any worker starts
    (otherwise every worker failed to boot with a traceback, and gunicorn gave up)."""
    env = os.environ if environ is None else environ
    cfg: dict[str, Any] = {}

    def number(name: str, kind: type, at_least: float, at_most: float = float("inf")) -> Any:
        text = env[name].strip()
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not at_least <= value <= at_most or value == float("inf"):  # nan fails this too
            what = "a whole number" if kind is int else "a number"
            upto = f" and at most {at_most:g}" if at_most < float("inf") else ""
            raise ValueError(f"{name}: expected {what} of at least {at_least:g}{upto}, got {text!r}")
        return value

    def flag(name: str) -> bool:
        # Strict: a typo ("ture") read as off would quietly drop HSTS and secure cookies.
        text = env[name].strip().lower()
        if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(f"{name}: expected on or off (1/0, true/false, yes/no), got {env[name]!r}")
        return text in ("1", "true", "yes", "on")

    if env.get("DERMSIGHT_SECRET_KEY"):
        cfg["SECRET_KEY"] = env["DERMSIGHT_SECRET_KEY"]
    if env.get("DERMSIGHT_MODEL"):
        cfg["MODEL"] = env["DERMSIGHT_MODEL"]
    if env.get("DERMSIGHT_BACKEND"):
        cfg["BACKEND"] = env["DERMSIGHT_BACKEND"].strip().lower()
        if cfg["BACKEND"] not in BACKENDS:
            names = f"{', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}"
            raise ValueError(f"DERMSIGHT_BACKEND: expected {names}, got {env['DERMSIGHT_BACKEND']!r}")
    if env.get("DERMSIGHT_THREADS"):
        cfg["THREADS"] = number("DERMSIGHT_THREADS", int, 1)
    if env.get("DERMSIGHT_MAX_UPLOAD_MB"):
        # At most 1 GB: a photo over 64 MB is refused anyway (data.images.MAX_FILE_BYTES), and 1e308 overflowed.
        cfg["MAX_CONTENT_LENGTH"] = int(number("DERMSIGHT_MAX_UPLOAD_MB", float, 0.01, at_most=1024) * 2**20)
    if env.get("DERMSIGHT_RATE_LIMIT"):
        cfg["RATE_LIMIT"] = env["DERMSIGHT_RATE_LIMIT"]
        try:
            parse_rate_limit(cfg["RATE_LIMIT"])
        except ValueError as e:
            raise ValueError(f"DERMSIGHT_RATE_LIMIT: {e}") from None
    if env.get("DERMSIGHT_RATE_LIMIT_STORAGE"):
        try:
            cfg["RATE_LIMIT_STORAGE"] = check_rate_limit_storage(env["DERMSIGHT_RATE_LIMIT_STORAGE"])
        except ValueError as e:
            raise ValueError(f"DERMSIGHT_RATE_LIMIT_STORAGE: {e}") from None
    if env.get("DERMSIGHT_PROXY_COUNT"):
        cfg["PROXY_COUNT"] = number("DERMSIGHT_PROXY_COUNT", int, 0)
    if env.get("DERMSIGHT_HTTPS"):
        cfg["HTTPS"] = flag("DERMSIGHT_HTTPS")
    if env.get("DERMSIGHT_LOAD_MODEL_AT_START"):
        cfg["LOAD_MODEL_AT_START"] = flag("DERMSIGHT_LOAD_MODEL_AT_START")
    return cfg


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in ("/api", "/healthz")


def create_app(predictor: Any = None, config: dict[str, Any] | None = None) -> Flask:
    """The web app. ``predictor``: an object with the `dermsight.inference.predictor.Predictor` interface; None
    loads the configured model lazily, in the worker process that first needs it."""
    app = Flask(__name__)
    # "//about" or "/conditions//mel" would otherwise be redirected to an absolute URL built from the request's Host
    # header, which anyone can set: a redirect to another site through ours. Such paths are simply not found.
    app.url_map.merge_slashes = False
    app.request_class = InMemoryRequest
    app.config.update(DEFAULTS)
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME="dermsight_session",
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep "status" first, as documented
    app.config.update(config_from_env())
    app.config.update(config or {})
    if not app.config.get("SECRET_KEY"):
        # Fine for one process. `dermsight serve` and gunicorn.conf.py generate one secret in the master before
        # forking, so all workers share it; several servers need DERMSIGHT_SECRET_KEY set to the same value.
        app.config["SECRET_KEY"] = secrets.token_hex(32)
        log.info("no DERMSIGHT_SECRET_KEY set: generated a per-process secret (form sessions end at restart)")
    app.config["SESSION_COOKIE_SECURE"] = bool(app.config["HTTPS"])
    if app.config["PROXY_COUNT"]:
        n = int(app.config["PROXY_COUNT"])
        # Client address and scheme only: every URL the app writes is relative, so a forwarded Host has no use.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=0)  # type: ignore[method-assign]

    _log_through_gunicorn()
    kpath = app.config["KNOWLEDGE_PATH"]
    app.extensions["dermsight.knowledge"] = load_knowledge(Path(kpath) if kpath else None)
    model = ModelService(predictor, app.config["MODEL"], app.config["BACKEND"], app.config["THREADS"])
    app.extensions["dermsight.model"] = model
    limit, window = parse_rate_limit(str(app.config["RATE_LIMIT"]))
    app.extensions["dermsight.ratelimit"] = RateLimit(app, limit, window, str(app.config["RATE_LIMIT_STORAGE"]))
    if app.config["LOAD_MODEL_AT_START"]:
        model.warm_up_in_background()

    from dermsight.web.api import api
    from dermsight.web.pages import pages

    app.register_blueprint(pages)
    app.register_blueprint(api)

    app.jinja_env.filters["sentence"] = sentence
    app.jinja_env.filters["percent"] = percent

    @app.context_processor
    def _template_globals() -> dict[str, Any]:
        return {
            "csrf_token": csrf_token,
            "version": __version__,
            "max_upload": human_size(app.config["MAX_CONTENT_LENGTH"]),
            # The whole request may be this large; the JS check leaves room for the form's other fields.
            "max_upload_bytes": app.config["MAX_CONTENT_LENGTH"] - 16 * 1024,
        }

    @app.after_request
    def _headers(response):
        security_headers(response, hsts=bool(app.config["HTTPS"]))
        if request.method == "POST" or request.path.startswith("/api/"):
            # Result pages carry the user's photo: never keep them in any cache.
            response.headers["Cache-Control"] = "no-store"
        elif response.mimetype == "text/html":
            # Pages carry this session's CSRF token: a shared cache must not hand them to someone else.
            response.headers["Cache-Control"] = "private, no-store"
        return response

    @app.get("/healthz")
    def healthz():
        # Ready (200) only once the model is loaded and passed its start-up self-test: a proxy or orchestrator then
        # sends traffic; "starting" and "failed" answer 503, so a broken model never takes requests silently.
        state = model.state()
        body = {"status": "ok" if state == "ready" else state, "version": __version__, "ready": state == "ready"}
        body["model_loaded"] = model.loaded
        if state == "failed":
            body["reason"] = model.failure
        return jsonify(body), 200 if state == "ready" else 503

    _register_errors(app)
    return app


def _log_through_gunicorn() -> None:
    """Under gunicorn, dermsight's own log lines (model loaded, errors) go to gunicorn's error log, timestamped."""
    gunicorn_log = logging.getLogger("gunicorn.error")
    ours = logging.getLogger("dermsight")
    if gunicorn_log.handlers and not ours.handlers:
        for handler in gunicorn_log.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


_FRIENDLY = {
    400: ("bad_request", "The request could not be understood."),
    404: ("not_found", "There is no page at this address."),
    405: ("method_not_allowed", "This address does not accept that kind of request."),
    500: ("internal_error", "Something went wrong on our side. Please try again in a moment."),
}


def _error_response(status: int, kind: str, message: str, tips: bool = False, retry_after: str | None = None):
    from flask import current_app

    knowledge = current_app.extensions["dermsight.knowledge"]
    photo_tips = list(knowledge.photo_tips) if tips else []
    if wants_json():
        body: dict[str, Any] = {"status": "error", "error": kind, "message": message}
        if photo_tips:
            body["tips"] = photo_tips
        response = jsonify(body)
    else:
        response = current_app.make_response(
            render_template("error.html", status=status, kind=kind, message=message, tips=photo_tips)
        )
    response.status_code = status
    if retry_after:
        response.headers["Retry-After"] = retry_after
    return response


def _register_errors(app: Flask) -> None:
    @app.errorhandler(RequestRefused)
    def _upload_problem(e: RequestRefused):
        return _error_response(e.status, e.kind, e.message, e.tips, e.retry_after)

    @app.errorhandler(413)
    def _too_large(e):
        length = request.content_length
        if length is not None and length <= app.config["MAX_CONTENT_LENGTH"]:
            # Within the upload limit, so one of Werkzeug's form limits fired (a text field over
            # MAX_FORM_MEMORY_SIZE, more than MAX_FORM_PARTS parts): usually an image sent as text, not as a file.
            return _error_response(
                413,
                "form_too_large",
                "The request's text fields are too large or too many. Send the photo as a file upload in the "
                f"'{UPLOAD_FIELD}' field (with curl: -F {UPLOAD_FIELD}=@photo.jpg, with the @).",
            )
        return _error_response(413, "too_large", too_large_message(app.config["MAX_CONTENT_LENGTH"]), tips=True)

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        status = e.code or 500
        kind, message = _FRIENDLY.get(status, (e.name.lower().replace(" ", "_"), e.name + "."))
        response = _error_response(status, kind, message)
        if isinstance(e, MethodNotAllowed) and e.valid_methods:
            response.headers["Allow"] = ", ".join(e.valid_methods)  # HTTP requires it on a 405
        return response

    @app.errorhandler(Exception)
    def _internal(e: Exception):
        # The traceback goes to the server log only; the upload itself is never in it.
        log.exception("unhandled error on %s %s", request.method, request.path)
        kind, message = _FRIENDLY[500]
        return _error_response(500, kind, message)
