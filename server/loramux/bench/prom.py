"""Read the server's Prometheus text: counters, and histograms as differences between two scrapes."""

from __future__ import annotations

import math
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str | None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}; empty for no text."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    if not text:
        return out
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def scrape(address: str, timeout: float = 30) -> str:
    """The Prometheus text that `HOST:PORT` serves at /metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as r:
        return r.read().decode()


def total(text: str | None, name: str, **labels: str) -> float:
    """The sum of sample `name`'s values whose labels include `labels` (0 when there is none)."""
    want = labels.items()
    return sum(v for (n, ls), v in samples(text).items() if n == name and want <= dict(ls).items())


def counter_delta(before: str | None, after: str | None, name: str) -> float | None:
    """How much a counter (summed over its labels) grew; None when the server does not export it."""
    a, b = samples(before), samples(after)
    keys = [k for k in b if k[0] in (name, f"{name}_total")]
    if not keys:
        return None
    return sum(b[k] - a.get(k, 0.0) for k in keys)


def histogram_delta(before: str | None, after: str | None, name: str) -> dict | None:
    """The observations a histogram gained between two scrapes, over all its labels but `le`.

    Returns {"count", "sum", "mean", "p50", "p90", "p99", "buckets": [[le, cumulative count], ...]},
    with quantiles interpolated inside buckets as Prometheus' histogram_quantile does.
    """
    a, b = samples(before), samples(after)
    buckets: dict[float, float] = {}
    count = total = 0.0
    found = False
    for (sample, labels), value in b.items():
        delta = value - a.get((sample, labels), 0.0)
        if sample == f"{name}_bucket":
            found = True
            le = float(dict(labels)["le"])
            buckets[le] = buckets.get(le, 0.0) + delta
        elif sample == f"{name}_count":
            count += delta
        elif sample == f"{name}_sum":
            total += delta
    if not found:
        return None
    cumulative = sorted(buckets.items())
    return {
        "count": int(count),
        "sum": total,
        "mean": total / count if count else None,
        "p50": bucket_quantile(cumulative, 0.50),
        "p90": bucket_quantile(cumulative, 0.90),
        "p99": bucket_quantile(cumulative, 0.99),
        "buckets": [[le if math.isfinite(le) else "+Inf", int(c)] for le, c in cumulative],
    }


def bucket_quantile(cumulative: list[tuple[float, float]], q: float) -> float | None:
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in cumulative:
        if c >= rank:
            if not math.isfinite(le):
                return prev_le  # in the open top bucket: the largest finite bound is all we know
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le
