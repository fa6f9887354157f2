"""Upstream-compatible import paths (``lmcache.v1.*``)."""
