"""`dermsight serve`: the web app and JSON API under gunicorn, or Flask's development server."""

from __future__ import annotations

import argparse
import sys

from dermsight.cli.common import EXIT_OK, EXIT_USAGE, MODEL_HELP, model_path, whole


def add_parser(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("serve", help="run the web app and JSON API (gunicorn)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    w.add_argument("--port", type=whole(0, 65535), default=8000, help="port (default 8000)")
    w.add_argument("--model", help=MODEL_HELP)
    w.add_argument("--workers", type=whole(1), help="worker processes (default: CPU cores, at most 4)")
    w.add_argument("--dev", action="store_true", help="Flask's development server, one process (not for production)")
    w.set_defaults(func=cmd_serve)


def cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (address unknown, port taken, no permission), or None."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        return f"cannot listen on {host!r}: {e.strerror}"
    with socket.socket(family, kind, proto) as probe:
        # As gunicorn binds: SO_REUSEADDR lets a port in TIME_WAIT be reused, never one another server listens on.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            hint = "; is another server running there? choose another with --port" if e.errno == 98 else ""
            return f"cannot listen on {host}:{port}: {e.strerror}{hint}"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from dermsight.domain.knowledge import KnowledgeError, load_knowledge
    from dermsight.inference.runtime import read_model_meta
    from dermsight.models.contract import ModelLoadError
    from dermsight.web.app import config_from_env
    from dermsight.web.server import default_workers, serve

    # The model, the knowledge file and the DERMSIGHT_* settings are checked here, once, so a mistake is one clear
    # line rather than every worker failing to boot.
    try:
        config_from_env()
        meta = read_model_meta(model_path(args.model))
        load_knowledge()
    except (ModelLoadError, KnowledgeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    problem = cannot_listen(args.host, args.port)
    if problem:
        # Otherwise gunicorn retries for seconds, logging an error each time, and exits 1.
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    workers = 1 if args.dev else (args.workers or default_workers())
    print(
        f"dermsight web app on http://{args.host}:{args.port}/ ({meta.network}, {len(meta.classes)} classes; "
        f"{'Flask development server' if args.dev else f'gunicorn, {workers} worker(s)'}); Ctrl+C stops it",
        flush=True,
    )
    serve(args.host, args.port, args.model, workers, dev=args.dev)
    return EXIT_OK
