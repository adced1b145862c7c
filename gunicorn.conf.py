"""Gunicorn settings for platforms that start gunicorn themselves (Procfile, Dockerfile):

    gunicorn -c gunicorn.conf.py "dermsight.web:create_app()"

`dermsight serve` applies the same settings (dermsight.web.server.gunicorn_options). Environment:
PORT (default 8000), WEB_CONCURRENCY (workers; default: CPU cores, at most 4), GUNICORN_HOST (default 0.0.0.0), and
the app's DERMSIGHT_* variables (see the README).
"""

import os

from dermsight.web.app import config_from_env
from dermsight.web.server import default_workers, gunicorn_options, import_inference_stack, prepare_environment

# A malformed setting is one line here, before gunicorn forks, not a traceback from every worker.
try:
    config_from_env()
except ValueError as e:
    raise SystemExit(f"error: {e}") from None
try:
    _port, _workers = int(os.environ.get("PORT", "8000")), int(os.environ.get("WEB_CONCURRENCY") or default_workers())
except ValueError:
    raise SystemExit("error: PORT and WEB_CONCURRENCY must be whole numbers") from None

_options = gunicorn_options(host=os.environ.get("GUNICORN_HOST", "0.0.0.0"), port=_port, workers=_workers)
bind = _options["bind"]
workers = _options["workers"]
worker_class = _options["worker_class"]
threads = _options["threads"]
preload_app = _options["preload_app"]
timeout = _options["timeout"]
graceful_timeout = _options["graceful_timeout"]
keepalive = _options["keepalive"]
max_requests = _options["max_requests"]
max_requests_jitter = _options["max_requests_jitter"]
limit_request_line = _options["limit_request_line"]
limit_request_fields = _options["limit_request_fields"]
worker_tmp_dir = _options["worker_tmp_dir"]
control_socket_disable = _options["control_socket_disable"]
accesslog = _options["accesslog"]
access_log_format = _options["access_log_format"]
errorlog = _options["errorlog"]

# This file runs in the master before it forks: one secret and one thread budget for every worker.
prepare_environment(workers)
os.environ.setdefault("DERMSIGHT_LOAD_MODEL_AT_START", "1")
import_inference_stack()
