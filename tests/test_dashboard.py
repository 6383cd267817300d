"""
etc/grafana-dashboard.json: a Grafana dashboard loadable as is (a Prometheus
datasource input and variable, every panel on it), whose every expression
names only metrics, and groups only by labels, that a real node's /metrics
exports.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any

import pytest
import pytest_twisted
from support.clients import connect
from support.processes import ROOT
from support.web import http_get
from twisted.internet import threads

DASHBOARD = ROOT / "etc" / "grafana-dashboard.json"
METRIC = re.compile(r"\b(pushservice_[a-z_]+)\b")
BY = re.compile(r"\bby\s*\(([^)]*)\)")


def bare_lf_request(port: int) -> bytes:
    """A request head with bare LF line ends (refused with 400 at once); the answer's first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\nHost: x\n\n")
        return sock.recv(100)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def test_dashboard_is_a_loadable_grafana_dashboard():
    """A datasource input and variable for Prometheus; every panel and query uses it; ids unique; the grid fits."""
    board = dashboard()
    (source,) = board["__inputs"]
    assert source["type"] == "datasource" and source["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "${" + source["name"] + "}" in json.dumps(variables["datasource"]["current"])
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["targets"] and panel["title"] and panel["description"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].count("(") == target["expr"].count(
                ")"
            )
    wanted = {"connections", "deliveries", "queue depth", "oldest", "log lag", "errors by code", "slow", "redis up"}
    titles = " | ".join(p["title"].lower() for p in panels())
    assert all(w in titles for w in wanted), titles


@pytest.mark.slow  # a real twistd process
@pytest_twisted.ensureDeferred
async def test_every_metric_in_the_dashboard_is_exported(twistd_service, redis_sync):
    """Each metric the dashboard queries is a sample of a real node's /metrics, with the labels it groups by."""
    node = twistd_service()
    client = await connect(node.port)
    redis_sync.lpush(node.queue, "hello")
    await client.next_of("message")
    assert (await client.request(b"not json"))["code"] == "bad_request"  # an errors_total{code} sample
    answer = await threads.deferToThread(bare_lf_request, node.port)
    assert answer.startswith(b"HTTP/1.1 400"), answer  # an http_refusals_total{status} sample
    body = (await threads.deferToThread(http_get, node.url + "/metrics")).body
    from prometheus_client.parser import text_string_to_metric_families

    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    for expr in expressions():
        names = METRIC.findall(expr)
        assert names, expr
        for name in names:
            assert name in labels, f"{name} (in {expr!r}) is not in /metrics: {sorted(labels)}"
        for group in BY.findall(expr):
            for label in (part.strip() for part in group.split(",")):
                if label != "instance":  # Prometheus adds it when it scrapes
                    assert any(label in labels[n] for n in names), f"no {name} sample has label {label!r}: {expr}"
    await client.close()
