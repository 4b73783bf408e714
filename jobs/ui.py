"""`stridelab ui`: the MLflow UI on the sweeps' tracking store, bound to 127.0.0.1 by default."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="open the MLflow UI on the sweep runs",
        description="Run `mlflow server` on the same backend store as `stridelab sweep` (default sqlite:///<cwd>/mlflow.db).",
    )
    p.add_argument("--tracking-uri", "--backend-store-uri", dest="tracking_uri", default=None,
                   help="backend store (default sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=5000, help="port (default %(default)s)")
    p.add_argument("--print-command", action="store_true", help="print the mlflow command instead of running it")
    p.set_defaults(func=run)


def command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The `mlflow server` command line; artifacts are served from the store's own artifact locations."""
    import sys

    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]


def run(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from pipeline.errors import StridelabError
    from search.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise StridelabError(f"{uri} is already a tracking server: open it in a browser")
    if not 0 < args.port < 65536:
        raise StridelabError(f"--port must be in 1..65535, got {args.port}")
    cmd = command(uri, args.host, args.port)
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    print(f"MLflow UI at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
