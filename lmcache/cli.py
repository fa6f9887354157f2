"""The ``lmcache`` console script: ``lmcache server [flags]``, ``lmcache stats [URL]``, ``lmcache demo``.

Output piped into a program that stops reading early (``lmcache stats | head -3``) ends quietly.
"""

from __future__ import annotations

import argparse
import os
import sys

from lmcache import __version__

USAGE = (
    "usage: lmcache server [server flags]          run the cache server (see `lmcache server --help`)\n"
    "       lmcache stats [URL] [--watch SECONDS]   print a running server's summary (default URL: "
    "$LMCACHE_SERVER_URL, else ipc:///tmp/lmcache.sock)\n"
    "       lmcache demo [--tokens N]               store/lookup/load a synthetic prompt, print GB/s\n"
    "       lmcache --version"
)


def _stats_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcache stats", description="Print a running cache server's summary."
    )
    parser.add_argument(
        "url",
        nargs="?",
        default=None,
        help="the server, e.g. tcp://127.0.0.1:5555 [default: $LMCACHE_SERVER_URL, else ipc:///tmp/lmcache.sock]",
    )
    parser.add_argument(
        "--watch",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="print it again every SECONDS until Ctrl-C",
    )
    parser.add_argument(
        "--count", type=int, default=0, metavar="N", help="with --watch: stop after N summaries (0: never)"
    )
    return parser


def _stats(rest: list[str]) -> int:
    parser = _stats_parser()
    args = parser.parse_args(rest)
    if not (args.watch >= 0 and args.watch != float("inf")):  # also refuses nan
        parser.error(f"--watch must be a finite number of seconds >= 0, got {args.watch}")
    if args.count < 0:
        parser.error(f"--count must be >= 0, got {args.count}")
    from lmcache.server.cli import print_stats

    return print_stats(args.url, watch_s=args.watch, count=args.count)


def _run(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        print(f"lmcache-trtllm {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "server":
        from lmcache.server.cli import main as server_main

        return server_main(rest)
    if command == "stats":
        return _stats(rest)
    if command == "demo":
        from lmcache.demo import main as demo_main

        demo_main(rest)
        return 0
    print(f"lmcache: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): send what is still buffered nowhere and end quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


if __name__ == "__main__":
    sys.exit(main())
