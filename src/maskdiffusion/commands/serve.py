"""``maskdiffusion serve``: load a model and serve the web demo (:mod:`maskdiffusion.web`) until stopped."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from . import options


def add_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``maskdiffusion serve [--model ...] [--host 127.0.0.1] [--port 7860] [--request-timeout 120] ...``."""
    from ..web import DEFAULT_HOST, DEFAULT_PORT, REQUEST_TIMEOUT

    parser = commands.add_parser("serve", help="start the web demo (needs: pip install 'maskdiffusion[web]')")
    options.add_model_arguments(parser)
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; ::1 for IPv6; "
        "0.0.0.0 opens it to the network)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--request-timeout",
        type=options.above_zero("a number of seconds"),
        default=REQUEST_TIMEOUT,
        help=f"seconds of work one request may take; longer ones stop with a message (default {REQUEST_TIMEOUT:g})",
    )
    options.add_limits_argument(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the model, build the app and serve until Ctrl+C or SIGTERM; then remove the temporary files."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web demo needs Gradio: pip install 'maskdiffusion[web]'", file=sys.stderr)
        return 1
    from .. import web

    if not web.is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the app")
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop = Ctrl+C
    folders = None
    try:
        segmenter = options.load_segmenter(args)
        folders = web.RequestFolders()
        app = web.build_app(segmenter, folders=folders, request_timeout=args.request_timeout)
        try:
            web.launch(app, host=args.host, port=args.port, block=False)
        except OSError as error:
            print(
                f"error: cannot serve on {args.host} port {args.port} ({error}): the port is taken or the "
                "address is not one of this machine's; choose another --port or --host",
                file=sys.stderr,
            )
            return 1
        info = web.model_info(segmenter).splitlines()[0].replace("`", "")
        print(f"{info}; serving on {app.local_url} (Ctrl+C stops it)")
        for warning in segmenter.warnings([]):
            print(f"warning: {warning}")
        sys.stdout.flush()
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping the web demo")
        app.close()
    finally:
        if folders is not None:
            folders.close()
        signal.signal(signal.SIGTERM, previous)
    return 0
