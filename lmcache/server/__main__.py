"""``python -m lmcache.server``: the same command as ``python -m lmcache.v1.multiprocess.server``."""

import sys

from lmcache.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
