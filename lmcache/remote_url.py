"""Remote tier URLs (``remote_url``): the forms accepted, what is wrong with one, and how one is shown
without its password."""

from __future__ import annotations

URL_FORMS = (
    "redis://[user:password@]host[:port][/db], rediss://..., valkey://..., unix:///path/to.sock or "
    "redis-cluster://[user:password@]host:port[,host:port...]"
)


def mask_password(url: str) -> str:
    """``url`` with any password replaced by ``***`` (error messages and logs never show secrets); the
    user part ends at the last ``@``, so a password holding ``/`` or ``@`` is masked whole. A user
    part without ``:`` is masked whole too (redis-cluster:// reads it as the password). So is a
    ``password=`` query parameter, which redis-py takes too (``unix:///path?password=...``)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if sep and at:
        user = userinfo.split(":", 1)[0] + ":" if ":" in userinfo else ""
        url = f"{scheme}://{user}***@{hosts}"
    base, question, query = url.partition("?")
    if not question:
        return url
    params = ("password=***" if p.split("=", 1)[0] == "password" else p for p in query.split("&"))
    return f"{base}?{'&'.join(params)}"


_USERINFO_ESCAPES = (("/", "%2F"), ("?", "%3F"), ("#", "%23"))


def client_url(url: str) -> str:
    """``url`` as redis-py must be given it: ``/``, ``?`` and ``#`` in the user part percent-encoded.

    The user part ends at the last ``@`` (as :func:`url_problem` and :func:`mask_password` read it);
    redis-py's parser ends it at the first of those characters instead, and would take a piece of
    the password for the host or port."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at:
        return url
    for char, escaped in _USERINFO_ESCAPES:
        userinfo = userinfo.replace(char, escaped)
    return f"{scheme}://{userinfo}@{hosts}"


def url_problem(url: str) -> str | None:
    """What is wrong with a remote URL (scheme, host, port, db, cluster seeds), or None."""
    scheme, _, rest = url.partition("://")
    rest = rest.rpartition("@")[2]  # past the user part, which may hold "/" or "@"
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    if scheme == "unix":
        return None if rest.split("?", 1)[0].startswith("/") else "has no socket path (unix:///path/to.sock)"
    seeds = netloc.split(",") if scheme == "redis-cluster" else [netloc]
    if scheme != "redis-cluster" and len(seeds[0].split(",")) > 1:
        return "names several hosts (only redis-cluster:// takes a seed list)"
    if not any(seed.strip() for seed in seeds):
        return "has no host" if scheme != "redis-cluster" else "has no host:port seed"
    for seed in seeds:
        seed = seed.strip()
        if not seed:
            return "has an empty seed in its host list"
        if seed.startswith("["):
            if "]" not in seed:
                return f"has an unclosed '[' in {seed!r} ([IPv6]:port)"
            host, _, port = seed[1:].partition("]")
            if port and not port.startswith(":"):
                return f"has {port!r} after the bracketed host in {seed!r} ([IPv6]:port)"
            port = port[1:]
        else:
            host, _, port = seed.rpartition(":") if ":" in seed else (seed, "", "")
            if ":" in host:
                return f"has ':' in the host of {seed!r} (IPv6 hosts go in brackets: [IPv6]:port)"
        if not host:
            return f"has no host in {seed!r}"
        if seed.endswith(":"):
            return f"has an empty port in {seed!r} (host:port, or host alone for 6379)"
        if scheme == "redis-cluster" and not port:
            return f"has no port in the seed {seed!r} (host:port)"
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            return f"has an invalid port {port!r} (1-65535)"
    path = rest.split("?", 1)[0].partition("/")[2]
    if scheme == "redis-cluster" and path not in ("", "0"):
        return f"names the database {path!r} (a Redis Cluster has only database 0: leave it out)"
    if scheme != "redis-cluster" and path and not path.isdigit():
        return f"has an invalid database number {path!r} (an integer after the host, e.g. /0)"
    return None
