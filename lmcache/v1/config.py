"""Upstream import path: ``from lmcache.v1.config import LMCacheEngineConfig`` keeps working."""

from lmcache.config import LMCacheEngineConfig, load_engine_config

__all__ = ["LMCacheEngineConfig", "load_engine_config"]
