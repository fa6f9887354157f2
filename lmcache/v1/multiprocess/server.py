"""``python -m lmcache.v1.multiprocess.server``: the standalone cache server (see lmcache.server.cli).

Example (the documented TRT-LLM launch)::

    python -m lmcache.v1.multiprocess.server --host 0.0.0.0 --port 5555 \\
        --l1-size-gb 10 --eviction-policy LRU --max-workers 4 --chunk-size 256
"""

import sys

from lmcache.server.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
