"""A cache server of another protocol version, standing in for a server of another lmcache release:
it answers every request of this release's clients ``version_mismatch``. Takes the server's flags."""

import sys

from lmcache.server import protocol

protocol.PROTOCOL_VERSION += 1  # read by the request decoder at every request

from lmcache.server.cli import main  # noqa: E402 (after the version is changed)

sys.exit(main())
