"""``segany serve``: the web tool and its HTTP API.

Nothing heavy is imported here: ``segany --help`` must work without fastapi or onnx installed.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from segany.errors import SegAnyError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model name (see `segany models`) or checkpoint path")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port of the web tool and the API (default: 8000)")
    p.add_argument("--cache-mb", type=float, default=1024, help="memory for cached embeddings, MiB (default: 1024)")
    p.add_argument("--max-upload-mb", type=float, default=25, help="largest upload accepted, MiB (default: 25)")
    p.add_argument("--max-pixels", type=int, default=50_000_000,
                   help="largest image accepted, pixels (default: 50000000)")
    p.add_argument("--dataset-dir", help="annotation mode: accepted masks are saved under this folder")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow this origin to call the API from a page it serves (repeatable; none by default)")


def _check(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise SegAnyError(f"--port {args.port}: must be in 1..65535")
    for name in ("cache_mb", "max_upload_mb", "max_pixels"):
        if getattr(args, name) <= 0:
            raise SegAnyError(f"--{name.replace('_', '-')} must be positive")
    if args.dataset_dir and Path(args.dataset_dir).exists() and not Path(args.dataset_dir).is_dir():
        raise SegAnyError(f"--dataset-dir {args.dataset_dir}: exists and is not a folder")


def run(args: argparse.Namespace) -> int:
    _check(args)
    try:
        import uvicorn

        from segany.serve.app import ServerSettings, create_app
    except ImportError as e:
        raise SegAnyError(f"the server needs its extra packages: pip install 'segany[serve]' ({e})") from None
    from segany.checkpoint import load_model

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"segany serve: warning: listening on {args.host}, reachable from other machines; "
              "the API has no authentication", file=sys.stderr)
    settings = ServerSettings(
        cache_mb=args.cache_mb, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
        dataset_dir=Path(args.dataset_dir) if args.dataset_dir else None, cors_origins=args.cors_origin,
    )
    app = create_app(load_model(args.model, device=args.device), settings, model_name=Path(str(args.model)).name)
    print(f"segany serve: http://{args.host}:{args.port}/ (API docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

