"""Reading this process's own Prometheus metrics in tests and benchmarks."""

from __future__ import annotations

from service.core import observability


def statements_sent() -> float:
    """SQL statements this process has sent so far (fleet_payouts_db_queries_total, all labels)."""
    return sum(
        s.value
        for metric in observability.DB_QUERIES.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    )
