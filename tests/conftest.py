"""Fixtures shared by every test folder."""

import os
import secrets

from support.e2e import lmcache_env  # noqa: F401  (a fixture)

# Every server and client of the test session (subprocesses inherit it) shares one server secret, so
# no test writes ~/.lmcache/server_secret; tests of the secret file clear it.
os.environ.setdefault("LMCACHE_SERVER_SECRET", secrets.token_hex(32))
