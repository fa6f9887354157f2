"""The Grafana dashboard and Prometheus alert rules in examples/ only use metrics /metrics really serves.

A cache server with every tier configured (L1, disk, an unreachable remote) serves its endpoint;
after a little traffic its metric names (histogram ``_bucket``/``_sum``/``_count`` and counter
``_total`` samples included) must cover every name in the dashboard's queries and the rules' ``expr``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.server_process import CHUNK, MODEL, TPB, ServerProcess, free_port, metrics_base_url, shared_pool

from lmcache.server.client import CacheServerClient
from lmcache.transfer import BlockTransfer

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "examples" / "grafana" / "lmcache-dashboard.json"
ALERTS = REPO / "examples" / "prometheus" / "lmcache-alerts.yml"
# Series Prometheus writes itself for every scrape target, never served by /metrics.
SCRAPE_SERIES = {"up"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORD = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects (functions, keywords, labels, durations dropped)."""
    expr = _STRING.sub('""', expr)
    expr = _MATCHERS.sub("", expr)
    expr = _RANGES.sub("", expr)
    expr = _GROUPING.sub("", expr)
    names = set()
    for m in _WORD.finditer(expr):
        is_call = expr[m.end() :].lstrip().startswith("(")
        if not is_call and m.group().lower() not in _KEYWORDS:
            names.add(m.group())
    return names


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and the variables' label_values selectors."""
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = _LABEL_VALUES.match(var["query"]["query"])
            assert m is not None, var["query"]
            queries.append(m.group(1))
    return queries


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(lmcache_x_bucket{instance=~"$i"}[$__rate_interval]))', {"lmcache_x_bucket"}),
        ("count(a == 0) or vector(0)", {"a"}),
        ('up{job="lmcache"} == 0 and on (instance) b offset 5m > 1e3', {"up", "b"}),
        ('histogram_quantile(0.99, sum(rate(c[5m])) by (le)) / d{kind!~"e|f"}', {"c", "d"}),
        ("sum without (tier) (increase(g:h_total[1h])) unless bool i", {"g:h_total", "i"}),
    ],
)
def test_metric_names_parser(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_dashboard_imports_cleanly() -> None:
    """What Grafana's import needs: unique panel ids, a place for each panel, the data source variable."""
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(
        {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for p in dash["panels"]
    )
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]


def test_every_query_selects_something() -> None:
    exprs = dashboard_queries() + alert_exprs()
    assert len(exprs) > 40
    for expr in exprs:
        assert metric_names(expr), expr


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lmcm-", dir="/tmp"))  # short: Unix socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


def served_names(base: str) -> set[str]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_dashboard_and_alerts_use_served_metrics(workdir: Path) -> None:
    config = workdir / "server.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "local_disk": str(workdir / "disk"),
                "max_local_disk_size": 0.01,
                "remote_url": f"redis://127.0.0.1:{free_port()}",  # nothing listens there
            }
        )
    )
    server = ServerProcess(workdir, None, "--config", str(config), "--metrics-port", "0").start()
    try:
        base = metrics_base_url(server)
        with CacheServerClient(server.ipc_url, timeout_s=20.0) as client:
            client.register(shared_pool(seed=3), 0, 1, MODEL, TPB, pool_sharing="export")
            tokens = list(range(500, 500 + 2 * CHUNK))
            assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, len(tokens))) == len(tokens)
            assert client.lookup(tokens) == len(tokens)
            assert client.retrieve(BlockTransfer(tokens, None, list(range(8, 16)), 0, len(tokens))) == len(
                tokens
            )
            served = served_names(base)
    finally:
        server.stop()

    for where, exprs in (("dashboard", dashboard_queries()), ("alert rules", alert_exprs())):
        used = set().union(*map(metric_names, exprs))
        missing = used - served - SCRAPE_SERIES
        assert not missing, f"{where} use metrics /metrics does not serve: {sorted(missing)}"
    assert {"lmcache_lookup_duration_seconds_bucket", "lmcache_tier_healthy"} <= served
