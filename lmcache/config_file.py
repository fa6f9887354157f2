"""Reading a YAML config file (``LMCACHE_CONFIG_FILE``, the server's ``--config``).

Every problem is one line that starts with how the user named the file (``--config '/etc/x.yaml'``,
``LMCACHE_CONFIG_FILE='/etc/x.yaml'``), says what is wrong and what to do, and never shows the
file's text (the path may name a file that is not a config at all).
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

import yaml

__all__ = ["read_config_file"]

_KEY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_OS_PROBLEMS = {
    errno.ENOENT: "no such file (check the path)",
    errno.EISDIR: "is a directory (expected a YAML file of config keys)",
    errno.ENOTDIR: "a part of the path is not a directory (check the path)",
    errno.EACCES: "permission denied (make the file readable by the user running lmcache)",
    errno.EPERM: "permission denied (make the file readable by the user running lmcache)",
    errno.ELOOP: "too many symbolic links (check the path)",
    errno.ENAMETOOLONG: "the path is too long",
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping naming one key twice (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                shown = repr(key) if _KEY_NAME.fullmatch(key) else "an entry"  # never echo other text
                raise ValueError(f"{shown} is given twice (lines {seen[key]} and {line}); keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _os_problem(e: OSError) -> str:
    return _OS_PROBLEMS.get(e.errno or 0) or f"cannot be read ({e.strerror or e})"


def _parse(path: str) -> object:
    """The YAML document at ``path``; ValueError with the problem (no prefix), OSError as opened."""
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only
        except UnicodeDecodeError:
            raise ValueError("not a UTF-8 text file (expected a YAML mapping of config keys)") from None
        except yaml.YAMLError as e:
            # Only where and what, never the offending text.
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or "parse error"
            raise ValueError(f"not valid YAML{where}: {problem}") from None


def read_config_file(path: str | os.PathLike[str], named: str) -> dict[str, Any]:
    """The mapping of config keys in the YAML file at ``path``; an empty file gives ``{}``.

    ``named`` is how the user gave the path (``--config '/x.yaml'``); it starts every error. A file
    that cannot be opened raises FileNotFoundError (missing) or ValueError; a bad file ValueError.
    """
    try:
        data = _parse(os.fspath(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{named}: {_os_problem(e)}") from None
    except OSError as e:
        raise ValueError(f"{named}: {_os_problem(e)}") from None
    except ValueError as e:
        raise ValueError(f"{named}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
        raise ValueError(
            f"{named}: expected a YAML mapping of config keys (such as chunk_size: 256), "
            f"got a {kind.get(type(data), type(data).__name__)}"
        )
    if not all(isinstance(key, str) and _KEY_NAME.fullmatch(key) for key in data):
        # Not even shaped like config keys (a file that is not a config): never echo its text.
        raise ValueError(
            f"{named}: contains an entry that is not a config key name (expected a YAML mapping of keys "
            "such as chunk_size: 256; is this the right file?)"
        )
    return data
