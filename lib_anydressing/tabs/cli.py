"""`python -m lib_anydressing ui`: the AnyDressing tab served on this machine, with the built-in default
(GrabCut) and any SAM checkpoints in models/sam. gradio is imported only when this command runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--sam-dir", type=Path, action="append", default=[], help="extra folder with SAM checkpoints")
    parser.add_argument("--outputs", type=Path, default=Path("outputs/anydressing"), help="where Save writes")


def main(args: argparse.Namespace) -> int:
    from .app import EXTENSION_SAM_DIR, standalone_app

    dirs = [EXTENSION_SAM_DIR, *args.sam_dir]
    standalone_app(lambda: dirs, args.outputs).queue().launch(server_name=args.host, server_port=args.port)
    return 0
