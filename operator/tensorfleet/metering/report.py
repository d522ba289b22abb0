"""Usage reports: totals per tenant, model, tier and time window, as a table, CSV or JSON, and a chart.

Only billable records count; cold starts are listed apart. Costs add up as decimals per currency: the
currency is always part of a row's group, so amounts in two currencies are never summed into one.
Bad input (an option, or a record's field) raises ValueError naming the option or the record and field.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

GROUP_KEYS = ("tenant", "model", "tier", "window", "service", "namespace", "gpuProduct", "currency")
COLUMNS = ("requests", "inputTokens", "outputTokens", "cachedTokens", "gpuMs", "resourceUnits", "cost")
COUNTS = ("estimatedRequests", "truncatedRequests", "truncatedTokens", "runawayStopped")  # numeric, after COLUMNS
MAX_WINDOW = datetime.timedelta(days=3650)


@dataclasses.dataclass
class Totals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    gpu_ms: float = 0.0
    resource_units: float = 0.0
    cost: Decimal = Decimal(0)
    estimated: int = 0
    truncated: int = 0  # requests whose oldest turns the gateway dropped (tokenPolicy.contextStrategy)
    truncated_tokens: int = 0
    runaway_stopped: int = 0  # generations stopped by runaway control

    def add(self, body: dict[str, Any]) -> None:
        """Add one record (of one currency: the caller groups by it); ValueError names a bad field."""
        self.requests += 1
        self.input_tokens += _count(body, "inputTokens")
        self.output_tokens += _count(body, "outputTokens")
        self.cached_tokens += _count(body, "cachedTokens")
        self.gpu_ms += _amount(body, "gpuMs")
        self.resource_units += _amount(body, "resourceUnits")
        self.cost += _price(body)
        self.estimated += 1 if body.get("estimated") else 0
        self.truncated += 1 if body.get("truncated") else 0
        self.truncated_tokens += _count(body, "truncatedTokens")
        self.runaway_stopped += 1 if body.get("runawayStopped") else 0

    def row(self) -> dict[str, Any]:
        return {"requests": self.requests, "inputTokens": self.input_tokens, "outputTokens": self.output_tokens,
                "cachedTokens": self.cached_tokens, "gpuMs": round(self.gpu_ms, 3),
                "resourceUnits": round(self.resource_units, 3), "cost": format(self.cost.normalize(), "f"),
                "estimatedRequests": self.estimated, "truncatedRequests": self.truncated,
                "truncatedTokens": self.truncated_tokens, "runawayStopped": self.runaway_stopped}


def _count(body: dict[str, Any], field: str) -> int:
    value = body.get(field)
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():  # a sink may store JSON numbers as floats
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field}={value!r}: must be a whole number, 0 or more")
    return value


def _amount(body: dict[str, Any], field: str) -> float:
    value = body.get(field)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"{field}={value!r}: must be a finite number, 0 or more")
    return float(value)


def _price(body: dict[str, Any]) -> Decimal:
    value = body.get("price")
    if value is None:
        return Decimal(0)
    try:
        price = None if isinstance(value, bool) or not isinstance(value, str | int | float) else Decimal(str(value))
    except InvalidOperation:
        price = None
    if price is None or not price.is_finite() or price < 0:
        raise ValueError(f"price={value!r}: must be a decimal string, 0 or more (e.g. \"0.0012\")")
    return price


def _currency(body: dict[str, Any]) -> str:
    value = body.get("currency")
    if value is None or value == "":
        return "-"
    if not isinstance(value, str):
        raise ValueError(f"currency={value!r}: must be a currency code such as \"USD\"")
    return value


def _record(body: object, index: int) -> str:
    """How an error names a record: its id, else its position in the input."""
    record_id = body.get("id") if isinstance(body, dict) else None
    return f"record {record_id}" if isinstance(record_id, str) and record_id else f"record #{index + 1}"


def record_time(body: dict[str, Any]) -> datetime.datetime:
    """A record's ``time``; ValueError names the field."""
    value = body.get("time")
    if not isinstance(value, str):
        raise ValueError("time is missing" if value is None else f"time={value!r}: must be an RFC 3339 string")
    try:
        return parse_time(value)
    except ValueError:
        raise ValueError(f"time={value!r}: must be an RFC 3339 time such as 2026-11-21T13:45:31.670Z") from None


def parse_time(value: str) -> datetime.datetime:
    moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def parse_window(value: str) -> datetime.timedelta:
    """``30s``, ``15m``, ``1h``, ``1d`` (1 s to 3650 d); ValueError names the option and the limit."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = float(value[:-1]) * units[value[-1]]
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"--window={value!r}: expected a number and a unit s, m, h or d (e.g. 1h)") from None
    if not 1 <= seconds <= MAX_WINDOW.total_seconds():  # also false for nan
        raise ValueError(f"--window={value!r}: must be between 1s and {MAX_WINDOW.days}d")
    return datetime.timedelta(seconds=seconds)


def window_start(moment: datetime.datetime, window: datetime.timedelta) -> datetime.datetime:
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    try:
        return epoch + ((moment - epoch) // window) * window
    except OverflowError:
        raise ValueError(f"time={moment.isoformat()!r}: its {_describe(window)} window would start before "
                         "the year 1") from None


def billable(bodies: Iterable[dict[str, Any]], since: datetime.datetime | None,
             until: datetime.datetime | None) -> list[dict[str, Any]]:
    """The billable request records in [since, until); ValueError names a malformed record and its field."""
    out = []
    for index, body in enumerate(bodies):
        if not isinstance(body, dict):
            raise ValueError(f"{_record(body, index)}: must be a JSON object, not {type(body).__name__}")
        if body.get("kind") != "request" or not body.get("billable"):
            continue
        try:
            moment = record_time(body)
        except ValueError as exc:
            raise ValueError(f"{_record(body, index)}: {exc}") from None
        if (since and moment < since) or (until and moment >= until):
            continue
        out.append(body)
    return out


def aggregate(bodies: Iterable[dict[str, Any]], by: Sequence[str],
              window: datetime.timedelta | None) -> list[dict[str, Any]]:
    """One row per group and currency (sorted), with the totals; ValueError names a bad record's field."""
    for key in by:
        if key not in GROUP_KEYS:
            raise ValueError(f"--by {key}: unknown; expected some of {', '.join(GROUP_KEYS)}")
    keys = list(by) if "currency" in by else [*by, "currency"]  # costs never add across currencies
    groups: dict[tuple[str, ...], Totals] = {}
    for index, body in enumerate(bodies):
        try:
            values = [_group_value(body, key, window) for key in keys]
            groups.setdefault(tuple(values), Totals()).add(body)
        except ValueError as exc:
            raise ValueError(f"{_record(body, index)}: {exc}") from None
    return [{**dict(zip(keys, key, strict=True)), **groups[key].row()} for key in sorted(groups)]


def _group_value(body: dict[str, Any], key: str, window: datetime.timedelta | None) -> str:
    if key == "window":
        start = window_start(record_time(body), window or datetime.timedelta(hours=1))
        return start.isoformat().replace("+00:00", "Z")
    if key == "currency":
        return _currency(body)
    return str(body.get(key) or "-")


def render(rows: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps(rows, indent=2)
    if not rows:
        return "" if output == "csv" else "no billable usage in the selection\n"
    headers = list(rows[0])
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=headers, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    cells = [[str(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    numeric = {h for h in headers if h in COLUMNS or h in COUNTS}
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    for row_cells in cells:
        lines.append("  ".join(c.rjust(w) if h in numeric else c.ljust(w)
                               for c, h, w in zip(row_cells, headers, widths, strict=True)))
    return "\n".join(lines) + "\n"


def chart(bodies: Sequence[dict[str, Any]], window: datetime.timedelta, path: str | Path) -> None:
    """A PNG of resource units per window, one line per tenant (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[datetime.datetime, float]] = {}
    for body in bodies:
        start = window_start(record_time(body), window)
        tenant = str(body.get("tenant") or "-")
        series.setdefault(tenant, {})
        series[tenant][start] = series[tenant].get(start, 0.0) + _amount(body, "resourceUnits")
    figure, axes = plt.subplots(figsize=(10, 5), dpi=100)
    windows = sorted({w for points in series.values() for w in points})
    for tenant in sorted(series, key=lambda t: -sum(series[t].values())):
        values = [series[tenant].get(w, 0.0) for w in windows]
        axes.plot(windows, values, marker="o", markersize=3, label=tenant)  # type: ignore[arg-type]
    axes.set_title(f"Resource units per {_describe(window)} by tenant")
    axes.set_xlabel("time (UTC)")
    axes.set_ylabel("resource units (1 RU = 1 ms reference GPU at fp16)")
    axes.grid(alpha=0.3)
    if series:
        axes.legend(loc="upper left", fontsize="small", ncols=2)
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def _describe(window: datetime.timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
