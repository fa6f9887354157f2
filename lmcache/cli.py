"""The ``lmcache`` console script: ``lmcache server [flags]``, ``lmcache stats URL``, ``lmcache demo``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = (
        "usage: lmcache server [server flags]   run the cache server (see `lmcache server --help`)\n"
        "       lmcache stats URL               print a running server's summary\n"
        "       lmcache demo [--tokens N]       store/lookup/load a synthetic prompt, print GB/s"
    )
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        return 0
    command, rest = args[0], args[1:]
    if command == "server":
        from lmcache.server.cli import main as server_main

        return server_main(rest)
    if command == "stats":
        if len(rest) != 1:
            print("usage: lmcache stats URL   (e.g. tcp://127.0.0.1:5555 or ipc:///tmp/lmcache.sock)")
            return 2
        from lmcache.server.cli import main as server_main

        return server_main(["--stats", rest[0]])
    if command == "demo":
        from lmcache.demo import main as demo_main

        demo_main(rest)
        return 0
    print(f"lmcache: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
