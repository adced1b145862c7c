"""Serving the app with gunicorn: one set of settings for `dermsight serve` and for ``gunicorn.conf.py`` (Procfile,
Dockerfile), so a laptop and a container run the app the same way.

Workers are processes (each holds its own model, loaded after the fork); within a worker a few threads accept
connections while inference runs one request at a time on ``cores // workers`` intra-op threads, so workers never
fight over cores.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

MAX_DEFAULT_WORKERS = 4


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container CPU pinning, unlike os.cpu_count()
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(cpus: int | None = None) -> int:
    return max(1, min(MAX_DEFAULT_WORKERS, cpus or cpu_count()))


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    return max(1, (cpus or cpu_count()) // max(1, workers))


def gunicorn_options(host: str, port: int, workers: int | None = None) -> dict[str, Any]:
    """Gunicorn settings; see docs/deployment.md for why each is what it is."""
    workers = workers or default_workers()
    return {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": 4,  # connections one worker serves at once (uploads arrive while another request is inferred)
        "preload_app": False,  # each worker builds the app and loads the model after the fork
        "timeout": 60,  # a worker silent for this long is restarted; one prediction takes well under a second
        "graceful_timeout": 30,
        "keepalive": 5,
        "max_requests": 2000,  # recycle workers now and then, so slow leaks cannot accumulate
        "max_requests_jitter": 200,
        "limit_request_line": 4094,
        "limit_request_fields": 50,
        "worker_tmp_dir": "/dev/shm" if Path("/dev/shm").is_dir() else None,  # heartbeat files off slow disks
        # Gunicorn 23+ opens a control socket at one fixed path per user: two servers of one user would fight over
        # it, and nothing here uses it.
        "control_socket_disable": True,
        "accesslog": "-",  # request lines only (method, path, status): never bodies or file names
        # gunicorn's default line holds the query string and the referrer, which can carry what people typed or where
        # they came from; the path without its query is enough to operate a server.
        "access_log_format": '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss',
        "errorlog": "-",
    }


def prepare_environment(workers: int) -> None:
    """Settings every worker must share, fixed in the master before it forks.

    A secret generated per worker would make a form served by one worker fail its CSRF check on another.
    """
    os.environ.setdefault("DERMSIGHT_SECRET_KEY", secrets.token_hex(32))
    os.environ.setdefault("DERMSIGHT_THREADS", str(threads_per_worker(workers)))


def import_inference_stack() -> None:
    """Import dermsight's inference code in the gunicorn master, loading no model and running no op, so the forked
    workers share those pages copy-on-write; ONNX Runtime is imported by each worker when it loads its model. (The
    serving path imports no PyTorch: a model served from its ONNX export never needs it. A worker that must export
    a model first, or run it eagerly, imports PyTorch itself.)"""
    import dermsight.inference.predictor  # noqa: F401


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str | Path | None = None,
    workers: int | None = None,
    dev: bool = False,
) -> None:
    """Run the web app until interrupted: gunicorn, or Flask's development server with ``dev``."""
    from dermsight.web.app import create_app

    workers = 1 if dev else (workers or default_workers())
    if model is not None:
        os.environ["DERMSIGHT_MODEL"] = str(model)
    prepare_environment(workers)
    if dev:
        create_app(config={"LOAD_MODEL_AT_START": True}).run(host=host, port=port, threaded=True)
        return

    from gunicorn.app.base import BaseApplication

    import_inference_stack()

    class _Gunicorn(BaseApplication):
        def load_config(self) -> None:
            for key, value in gunicorn_options(host, port, workers).items():
                if value is not None and key in self.cfg.settings:  # older gunicorns lack some settings
                    self.cfg.set(key, value)

        def load(self):
            # With preload_app off this runs in each worker, after the fork.
            return create_app(config={"LOAD_MODEL_AT_START": True})

    _Gunicorn().run()
