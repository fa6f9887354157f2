"""Command line of the cache server: ``python -m lmcache.v1.multiprocess.server`` (or ``lmcache.server``).

Flags override ``--config`` (a YAML file of LMCacheEngineConfig keys); without ``--config`` the
base is ``LMCACHE_CONFIG_FILE`` plus ``LMCACHE_*`` variables, as in-process mode reads them.
``--stats URL`` prints a running server's summary and exits instead of serving.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from lmcache import __version__, gc_pauses
from lmcache.config import (
    CACHE_POLICIES,
    MAX_GIB,
    POOL_SHARING,
    LMCacheEngineConfig,
    check_host_resources,
    load_engine_config,
)
from lmcache.logging import ROOT_LOGGER_NAME, configure_from_env, init_logger, parse_level
from lmcache.server.security import add_security_arguments, env_typed, security_settings
from lmcache.server.settings import DEFAULT_L1_MEMORY, L1_MEMORY, L1_MEMORY_ENV
from lmcache.stats import summary_lines

if TYPE_CHECKING:
    from lmcache.server.stats_protocol import InstanceStats

logger = init_logger(__name__)

TYPICAL_TOKENS_PER_BLOCK = 32
"""TRT-LLM's default ``tokens_per_block``: a chunk size that is no multiple of it is warned about at start
(the workers' real value is known only when they register, where a mismatch is refused)."""

__all__ = ["build_parser", "main", "engine_config_from_args", "print_stats"]


def _config_source(args: argparse.Namespace) -> str:
    if args.config:
        return f"--config {args.config!r}"
    path = os.environ.get("LMCACHE_CONFIG_FILE", "").strip()
    return f"LMCACHE_CONFIG_FILE={path!r} and LMCACHE_*" if path else "defaults and LMCACHE_*"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" except where the default is None (the help then says what applies)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m lmcache.v1.multiprocess.server",
        description=(
            "LMCache multi-process cache server: one KV cache (CPU L1 and the configured tiers) shared by "
            "the TensorRT-LLM processes of this host (connector lmcache-mp). Listens on TCP and, "
            "by default, also on the Unix socket ipc:///tmp/lmcache.sock that clients use when no "
            "server_url is given."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="TCP address to listen on (0.0.0.0: all interfaces)"
    )
    parser.add_argument("--port", type=int, default=5555, help="TCP port to listen on (0: any free port)")
    parser.add_argument(
        "--ipc-path",
        default=os.environ.get("LMCACHE_SERVER_IPC_PATH", "/tmp/lmcache.sock"),
        help="Unix socket path served in addition to TCP (clients' default URL is ipc:///tmp/lmcache.sock); "
        "an empty string disables it; the default can also come from $LMCACHE_SERVER_IPC_PATH",
    )
    parser.add_argument(
        "--busy-poll-us",
        type=env_typed(float, "LMCACHE_SERVER_BUSY_POLL_US"),
        default=os.environ.get("LMCACHE_SERVER_BUSY_POLL_US", "0"),
        help="after each request, poll without sleeping for this many microseconds, so the next call "
        "of an active client is answered without a thread wake-up (keeps one core busy while clients "
        "are active; it slowed some loads: benchmarks/RESULTS.md, D18); 0: always sleep in poll; "
        "the default can also come from $LMCACHE_SERVER_BUSY_POLL_US",
    )
    parser.add_argument(
        "--l1-size-gb",
        type=_size_gib,
        default=None,
        help="L1 (CPU memory) cache size in GiB; pinned in the background from start-up on a CUDA host, "
        "else reserved as chunks arrive "
        "[default: max_local_cpu_size from --config / LMCACHE_*, else 5]",
    )
    parser.add_argument(
        "--eviction-policy",
        default=None,
        help=f"L1 eviction policy, one of {', '.join(CACHE_POLICIES)} "
        "[default: cache_policy from --config, else LRU]",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=4,
        help="worker threads running requests (requests of one client run in order, clients in parallel)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="tokens per cached chunk, a multiple of TRT-LLM's tokens_per_block "
        "[default: chunk_size from --config / LMCACHE_CHUNK_SIZE, else 256]",
    )
    parser.add_argument(
        "--pool-sharing",
        default=None,
        choices=list(POOL_SHARING),
        type=str.lower,
        help="how workers' KV pools are shared: export (the server maps the pool: CUDA IPC, or a CPU pool's "
        "shared memory), shared-l1 (the server maps nothing; each worker copies between its pool and "
        "the server's L1 in shared memory: needs the same user), auto (per pool: export where the pool "
        "can be exported, shared-l1 otherwise) "
        "[default: pool_sharing from --config / LMCACHE_POOL_SHARING, else auto]",
    )
    parser.add_argument(
        "--l1-memory",
        default=None,
        choices=list(L1_MEMORY),
        type=str.lower,
        help="how L1 is shared with workers that copy into it (shared-l1): fd (slabs passed by file "
        "descriptor over a Unix socket: made page-locked by the CUDA driver once, for every worker, where "
        "the server has a GPU; memfds elsewhere), shm (regions in /dev/shm, each page-locked by every "
        f"CUDA worker) [default: ${L1_MEMORY_ENV}, else fd]",
    )
    parser.add_argument(
        "--config", default=None, help="YAML file of LMCacheEngineConfig keys (flags override it)"
    )
    parser.add_argument(
        "--client-timeout-s",
        type=float,
        default=30.0,
        help="reap a client's pool mapping and pins after this many seconds without requests or heartbeats "
        "(clients heartbeat every second; chunks they stored stay cached); 0 disables reaping",
    )
    parser.add_argument(
        "--pin-ttl-s",
        type=env_typed(float, "LMCACHE_SERVER_PIN_TTL_S"),
        default=os.environ.get("LMCACHE_SERVER_PIN_TTL_S", "120"),
        help="drop a lookup's pins if no retrieve or release came for them within this many seconds "
        "(the default can also come from $LMCACHE_SERVER_PIN_TTL_S)",
    )
    parser.add_argument(
        "--max-frame-mb", type=float, default=64.0, help="largest request frame accepted, MiB"
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        type=str.upper,
        help="log level [default: LMCACHE_LOG_LEVEL, else INFO]",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics and JSON /health over HTTP on this port (0: any free port) "
        "[default: off]",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the /metrics and /health endpoint (0.0.0.0: all interfaces)",
    )
    add_security_arguments(parser)
    parser.add_argument(
        "--stats",
        metavar="URL",
        default=None,
        help="print the live summary of the server at URL (e.g. tcp://localhost:5555) and exit",
    )
    parser.add_argument("--version", action="version", version=f"lmcache-trtllm {__version__}")
    return parser


def _size_gib(text: str) -> float:
    """``--l1-size-gb``'s type: a number of GiB; ``10GB`` is refused with what to write instead."""
    try:
        return float(text)
    except ValueError:
        unit = text.strip().lstrip("+-0123456789.").strip()
        hint = f": write the number alone, without {unit!r}" if unit and unit != text.strip() else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB{hint} (e.g. 10)") from None


def _address_problem(host: str, port_flag: str) -> str | None:
    """Why ``host`` cannot be listened on, with what to pass instead; None when it resolves."""
    if not host.strip():
        return "is empty (give 127.0.0.1 for this host only, 0.0.0.0 for all interfaces)"
    bare = host.strip("[]")
    try:
        socket.getaddrinfo(bare, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        address, _, port = bare.rpartition(":")
        if address and port.isdigit() and ":" not in address:
            return f"includes a port: give the address alone ({address!r}) and the port with {port_flag}"
        reason = e.strerror if isinstance(e, socket.gaierror) else "not a valid host name"
        return (
            f"does not resolve to an address ({reason}); give an IP address (127.0.0.1: this host only, "
            "0.0.0.0: all interfaces) or a host name this machine resolves"
        )
    return None


def _finite(parser: argparse.ArgumentParser, flag: str, value: float, lo: float, strict: bool) -> None:
    """Exit with a message naming ``flag`` unless ``value`` is a finite number above ``lo``."""
    if not math.isfinite(value) or value < lo or (strict and value == lo):
        bound = f"> {lo:g}" if strict else f">= {lo:g}"
        parser.error(f"{flag} must be a finite number {bound}, got {value}")


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag's range, before anything starts; messages name the flag as typed."""
    if args.max_workers < 1:
        parser.error(f"--max-workers must be >= 1, got {args.max_workers}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.ipc_path and not os.path.isabs(args.ipc_path):  # clients name it by ipc:///ABSOLUTE/PATH
        parser.error(f"--ipc-path must be an absolute path (or empty: TCP only), got {args.ipc_path!r}")
    if not (math.isfinite(args.busy_poll_us) and 0 <= args.busy_poll_us <= 1e6):
        parser.error(f"--busy-poll-us must be in 0..1000000 (0: never busy-poll), got {args.busy_poll_us}")
    _finite(parser, "--max-frame-mb", args.max_frame_mb, 0.0, strict=True)
    _finite(parser, "--client-timeout-s", args.client_timeout_s, 0.0, strict=False)
    _finite(parser, "--pin-ttl-s", args.pin_ttl_s, 0.0, strict=True)
    if args.l1_size_gb is not None:
        _finite(parser, "--l1-size-gb", args.l1_size_gb, 0.0, strict=True)
        if args.l1_size_gb > MAX_GIB:
            parser.error(
                f"--l1-size-gb must be at most {MAX_GIB:.0f} (GiB: the byte count must fit 64 bits), "
                f"got {args.l1_size_gb:g}"
            )
    if args.l1_memory is None:
        args.l1_memory = os.environ.get(L1_MEMORY_ENV, DEFAULT_L1_MEMORY).strip().lower() or DEFAULT_L1_MEMORY
        if args.l1_memory not in L1_MEMORY:
            parser.error(f"${L1_MEMORY_ENV} must be one of {', '.join(L1_MEMORY)}, got {args.l1_memory!r}")
    if args.config == "":
        parser.error(
            "--config is empty: give the path of a YAML file, or leave --config out "
            "(LMCACHE_CONFIG_FILE and LMCACHE_* apply then)"
        )
    addresses = [("--host", args.host, "--port")]
    if args.metrics_port is not None:  # --metrics-host is used only with a metrics port
        addresses.append(("--metrics-host", args.metrics_host, "--metrics-port"))
    for flag, host, port_flag in addresses:
        problem = _address_problem(host, port_flag)
        if problem:
            parser.error(f"{flag} {host!r} {problem}")
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error(
            f"--chunk-size must be a positive integer (a multiple of tokens_per_block), got {args.chunk_size}"
        )
    if args.eviction_policy is not None and args.eviction_policy.upper() not in CACHE_POLICIES:
        parser.error(
            f"--eviction-policy must be one of {', '.join(CACHE_POLICIES)}, got {args.eviction_policy!r}"
        )
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
    level = os.environ.get("LMCACHE_LOG_LEVEL", "").strip()
    if level and args.log_level is None and parse_level(level) is None:
        parser.error(
            f"LMCACHE_LOG_LEVEL={level!r} is not a log level "
            "(use DEBUG, INFO, WARNING, ERROR or CRITICAL, or pass --log-level)"
        )


def engine_config_from_args(args: argparse.Namespace) -> LMCacheEngineConfig:
    """``--config`` (or ``LMCACHE_CONFIG_FILE`` + ``LMCACHE_*``) with the flags on top, validated."""
    if args.config:
        base = LMCacheEngineConfig.from_file(args.config, named=f"--config {args.config!r}")
    else:
        base = load_engine_config(log=False)
    overrides: dict[str, Any] = {}
    if args.chunk_size is not None:
        overrides["chunk_size"] = args.chunk_size
    if args.l1_size_gb is not None:
        overrides["max_local_cpu_size"] = args.l1_size_gb
        overrides["local_cpu"] = True
    if args.eviction_policy is not None:
        overrides["cache_policy"] = args.eviction_policy
    if args.pool_sharing is not None:
        overrides["pool_sharing"] = args.pool_sharing
    return base.with_overrides(**overrides) if overrides else base


def print_stats(url: str | None = None, *, watch_s: float = 0.0, count: int = 0) -> int:
    """Print the summary of the server at ``url`` (default: the clients' default URL); returns the exit
    code. With ``watch_s`` > 0, print it again every ``watch_s`` seconds, ``count`` times (0: until
    Ctrl-C). Imports neither torch nor the engine, so it answers at once."""
    from lmcache.server.client import CacheServerClient, ServerError, ServerUnavailable, normalize_url

    given = url
    try:
        url = normalize_url(url)
        with CacheServerClient(url, timeout_s=5.0, heartbeat_interval_s=0) as client:
            shown = 0
            while True:
                _print_summary(client.stats())
                shown += 1
                if watch_s <= 0 or shown == count:
                    return 0
                sys.stdout.flush()
                time.sleep(watch_s)  # the --watch refresh interval
                print()
    except (ServerUnavailable, ServerError, ValueError) as e:
        where = url or given or "the URL in $LMCACHE_SERVER_URL"
        print(f"lmcache: cannot read stats from {where}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _print_summary(info: Any) -> None:
    print(f"LMCache server {info.server_id} (protocol v{info.protocol_version}), up {info.uptime_s:.0f} s")
    for line in summary_lines(info.engine):
        print(f"  {line}")
    print(f"  lookups pinned for a load: {info.pinned_lookups}")
    print(f"  requests {info.requests}, errors {info.errors}, reaped clients {info.reaped_instances}")
    print(f"  pool sharing: {info.pool_sharing}, L1 memory: {info.l1_memory or 'not reported'}")
    print(f"  {gc_pauses.summary_line(info.gc)}")
    print(f"  clients: {len(info.instances)}")
    for inst in info.instances:
        print(f"    {instance_line(inst)}")


def instance_line(inst: InstanceStats) -> str:
    """One registered instance as ``lmcache stats`` prints it; a shared-L1 instance with the slots
    its lease holds ahead of its stores, an exported one with its requests waiting for a forward."""
    line = (
        f"instance {inst.instance_id} pid {inst.pid} rank {inst.rank}/{inst.world_size} "
        f"{inst.model_name} {inst.sharing or inst.pool_kind} {inst.pool_shape} {inst.dtype} "
        f"idle {inst.idle_s:.1f} s"
    )
    if inst.sharing == "shared-l1":
        return line + f", {inst.leased_slots} leased slots"
    return line + f", {inst.forward_waits} requests waiting for its forward" if inst.forward_waits else line


def main(argv: list[str] | None = None) -> int:
    """Run the server (or ``--stats``); returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.stats:
        _check_flags(parser, args)
    if args.log_level:
        logging.getLogger(ROOT_LOGGER_NAME).setLevel(args.log_level)
    else:
        configure_from_env()
    if args.stats:
        return print_stats(args.stats)
    try:
        config = engine_config_from_args(args)
        security = security_settings(args)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    logger.info("effective config (flags over %s): %s", _config_source(args), config.describe())
    if config.chunk_size % TYPICAL_TOKENS_PER_BLOCK:
        logger.warning(
            "%s %d is not a multiple of %d, TRT-LLM's default tokens_per_block: a worker is refused at "
            "registration unless its tokens_per_block divides the chunk size",
            "--chunk-size" if args.chunk_size is not None else "chunk_size",
            config.chunk_size,
            TYPICAL_TOKENS_PER_BLOCK,
        )
    check_host_resources(
        config,
        l1_name="--l1-size-gb" if args.l1_size_gb is not None else None,
        disk_name=None,
    )

    from lmcache.fd_slabs import FdSlabSource
    from lmcache.server.listeners import tcp_bind_problem
    from lmcache.server.server import (
        CacheServer,
        ServerConfig,
        ServerStartError,
        raise_descriptor_limit,
        server_engine,
        warn_if_descriptors_are_short,
    )
    from lmcache.shm_slabs import ShmSlabSource

    # Every client's request waits while a collection runs: the imported modules (torch's among them)
    # leave the collector's walks, and every pause is timed (gc_pauses).
    frozen = gc_pauses.freeze_imports()
    gc_pauses.watch()
    logger.debug("%d objects of the imported modules frozen out of the garbage collector's walks", frozen)

    descriptors = raise_descriptor_limit()
    try:
        engine = server_engine(config, config.pool_sharing, l1_memory=args.l1_memory)
    except (ImportError, ValueError, OSError) as e:
        parser.error(str(e))
    warn_if_descriptors_are_short(engine, descriptors)
    server = CacheServer(
        engine,
        ServerConfig(
            host=args.host,
            port=args.port,
            ipc_path=args.ipc_path or None,
            max_workers=args.max_workers,
            client_timeout_s=args.client_timeout_s,
            pin_ttl_s=args.pin_ttl_s,
            max_frame_bytes=int(args.max_frame_mb * (1 << 20)),
            busy_poll_s=args.busy_poll_us / 1e6,
            pool_sharing=config.pool_sharing,
            **security,
        ),
    )
    source = engine.l1.arena.source
    if isinstance(source, ShmSlabSource):
        where = f"in shared memory, {source.stale_removed} stale region(s) of a crashed server removed"
    elif isinstance(source, FdSlabSource):
        where = f"in {source.kind} slabs passed to workers by descriptor"
    else:
        where = "in private memory: no worker copies into it"
    logger.info(
        "engine: chunk_size=%d, L1 %g GiB %s (%s, %s), %d workers, pool sharing %s",
        config.chunk_size,
        config.max_local_cpu_size,
        where,
        config.cache_policy,
        "pinned in the background from start-up" if engine.l1.arena.pinned else "reserved as chunks arrive",
        args.max_workers,
        config.pool_sharing,
    )
    try:
        server.start()
    except ServerStartError as e:
        logger.error("%s", e)
        server.close()
        return 1
    metrics = None
    if args.metrics_port is not None:
        from lmcache.http_endpoint import MetricsEndpoint

        metrics = MetricsEndpoint(engine, host=args.metrics_host, port=args.metrics_port, server=server)
        try:
            metrics.start()
        except OSError as e:
            flags = ("--metrics-host", "--metrics-port")
            logger.error(
                "cannot serve metrics: %s", tcp_bind_problem(e, args.metrics_host, args.metrics_port, flags)
            )
            server.close()
            return 1
        logger.info("LMCache metrics on %s/metrics, health on %s/health", metrics.url, metrics.url)

    def _on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        server.serve_forever()
    finally:
        if metrics is not None:
            metrics.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
