"""Upstream import path of the multi-process cache server (``python -m lmcache.v1.multiprocess.server``)."""
