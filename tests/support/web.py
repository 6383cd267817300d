"""
Plain HTTP against a node: GET (blocking, or in a thread so a node in this
process keeps running), /healthz and /metrics.
"""

from __future__ import annotations

import http.client
import ssl
import time
import urllib.error
import urllib.request
from typing import NamedTuple

__all__ = ["Answer", "Metrics", "get", "health", "http_get", "http_status", "metrics", "scrape"]


class Answer(NamedTuple):
    """An HTTP answer: status (None when nothing answered), body (or why nothing answered), content type."""

    status: int | None
    body: str
    content_type: str = ""


def http_get(url: str, timeout: float = 5.0, context: ssl.SSLContext | None = None) -> Answer:
    """GET C{url}, blocking (for a node in this process, use L{get})."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return Answer(int(response.status), response.read().decode(), response.headers.get("content-type", ""))
    except urllib.error.HTTPError as e:
        return Answer(int(e.code), e.read().decode(), e.headers.get("content-type", ""))
    except (OSError, http.client.HTTPException) as e:
        return Answer(None, str(e))


def http_status(url: str, context: ssl.SSLContext | None = None, timeout: float = 5.0) -> int | None:
    """The status of GET C{url}, or None if nothing answered."""
    return http_get(url, timeout, context).status


async def get(url: str, timeout: float = 5.0) -> Answer:
    """L{http_get} in a thread, so the reactor (and a node in this process) runs meanwhile."""
    from twisted.internet import threads

    answer: Answer = await threads.deferToThread(http_get, url, timeout)
    return answer


def health(url: str, timeout: float = 5.0) -> tuple[int | None, float]:
    """GET C{url}/healthz: its status, and the seconds the answer took."""
    started = time.monotonic()
    status = http_status(url + "/healthz", timeout=timeout)
    return status, time.monotonic() - started


Labels = tuple[tuple[str, str], ...]


class Metrics(NamedTuple):
    """A /metrics page: its content type, samples without labels by name, and labelled ones by (name, labels)."""

    content_type: str
    plain: dict[str, float]
    labelled: dict[tuple[str, Labels], float]


def scrape(url: str) -> Metrics:
    """The node's /metrics, parsed (blocking)."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = http_get(url + "/metrics")
    assert answer.status == 200, answer
    plain: dict[str, float] = {}
    labelled: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(answer.body):
        for sample in family.samples:
            if sample.labels:
                labelled[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            else:
                plain[sample.name] = sample.value
    return Metrics(answer.content_type, plain, labelled)


async def metrics(url: str) -> dict[str, float]:
    """The node's /metrics samples without labels, by name (read in a thread)."""
    from twisted.internet import threads

    scraped: Metrics = await threads.deferToThread(scrape, url)
    return scraped.plain
