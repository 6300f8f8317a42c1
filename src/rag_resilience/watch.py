"""`rag-resilience watch`: every circuit and limit of a service, live, in the terminal.

    rag-resilience watch --redis redis://127.0.0.1:6379/0      # every replica sharing the store
    rag-resilience watch --url http://127.0.0.1:9465/stats      # one app's stats endpoint
    rag-resilience watch --redis ... --json                     # JSON lines (also when piped)

From Redis it reads what the stores keep (see `stores/redis.py`): each breaker's record at
``{prefix}:kv:rag_resilience:{name}:breaker`` (state, failures, when it opened, when the
next probe is due), each shared limit's leases at ``{prefix}:lease:{rag_resilience:{name}:limit}``
(permits held across replicas), and the per-replica samples a `StatsPublisher` writes at
``{prefix}:kv:rag_resilience:{name}:stats:{replica}`` (calls, failures and degraded answers
per second over the last minute, queue depth). "Now" is the Redis server's clock, the one
shared state is kept on. From an endpoint (`stats_endpoint.serve_stats`) it reads the samples.

Each row (also each JSON line's ``circuits``) has: ``name``, ``state``, ``open_for_s``,
``next_probe_s``, ``failures``, ``replicas``, ``in_flight``, ``queue_depth``, ``calls_1m``,
``error_rate_1m``, ``degraded_rate_1m``, ``spark`` (errors and degraded share per second,
last minute), ``interrupted`` and ``parse_failures`` (totals over the replicas' samples),
and ``rate_limit`` (None without pacing): ``paced``, ``paced_seconds``, ``rejected``,
``throttled_429`` (summed over replicas) and ``upstreams``, one entry per upstream (base
URL, model and a hash of the API key) with its learned ``requests_per_s`` /
``tokens_per_s`` and their ``*_source`` (the freshest replica's), ``requests_headroom`` /
``tokens_headroom`` (the share of the burst free now: the lowest any replica reports) and
``waiting`` (callers waiting for a slot, summed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "HttpSource",
    "RedisSource",
    "build_rows",
    "main",
    "merge_rate_limits",
    "render",
    "sparkline",
]

WINDOW_S = 60
_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Iterable[float | None]) -> str:
    """One character per value in [0, 1] (None: no calls that second)."""
    out = []
    for value in values:
        if value is None:
            out.append(" ")
        else:
            out.append(_BARS[min(len(_BARS) - 1, max(0, round(value * (len(_BARS) - 1))))])
    return "".join(out)


# -- sources -----------------------------------------------------------------------------------
class RedisSource:
    """Reads breakers, limits and published samples straight from a Redis store."""

    def __init__(self, url: str, prefix: str = "rag_resilience", client: Any = None) -> None:
        if client is None:
            try:
                import redis
            except ImportError as exc:  # pragma: no cover - exercised only without the extra
                raise ImportError(
                    "watch --redis needs redis: pip install 'rag-resilience[redis]'"
                ) from exc
            client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.client = client
        self.prefix = prefix
        self.where = url

    def _scan(self, pattern: str) -> list[str]:
        keys = [
            k.decode() if isinstance(k, bytes) else k
            for k in self.client.scan_iter(pattern, count=500)
        ]
        return sorted(keys)

    def _json(self, keys: list[str]) -> list[Any]:
        if not keys:
            return []
        out = []
        for raw in self.client.mget(keys):
            try:
                out.append(json.loads(raw) if raw is not None else None)
            except ValueError:
                out.append(None)  # an unreadable value is absent, as for the stores
        return out

    def read(self) -> dict[str, Any]:
        seconds, micros = self.client.time()
        now = float(seconds) + float(micros) / 1e6
        kv = f"{self.prefix}:kv:rag_resilience:"
        breaker_keys = self._scan(f"{kv}*:breaker")
        breakers = {
            key[len(kv) : -len(":breaker")]: rec
            for key, rec in zip(breaker_keys, self._json(breaker_keys), strict=True)
            if isinstance(rec, dict)
        }
        samples = [s for s in self._json(self._scan(f"{kv}*:stats:*")) if isinstance(s, dict)]
        lease = f"{self.prefix}:lease:{{rag_resilience:"
        limits: dict[str, int] = {}
        for key in self._scan(f"{lease}*:limit}}"):
            limits[key[len(lease) : -len(":limit}")]] = int(
                self.client.zcount(key, f"({now!r}", "+inf")
            )
        return {"time": now, "breakers": breakers, "limits": limits, "samples": samples}


class HttpSource:
    """Reads an app's stats endpoint (`stats_endpoint.serve_stats`)."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.where = url
        self.timeout = timeout

    def read(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.where, timeout=self.timeout) as response:
            body = json.loads(response.read().decode())
        return {
            "time": float(body.get("time", time.time())),
            "breakers": {},
            "limits": {},
            "samples": list(body.get("policies", [])),
        }


# -- rows -------------------------------------------------------------------------------------
def _breaker_row(rec: dict[str, Any], now: float) -> dict[str, Any]:
    state = str(rec.get("s", "closed"))
    open_until = float(rec.get("ou", 0.0))
    opened_at = float(rec.get("oa", 0.0))
    if state == "open" and now >= open_until:
        state = "half_open"  # as `CircuitBreaker.get_state` reads it
    return {
        "state": state,
        "failures": int(rec.get("f", 0)),
        "open_for_s": round(now - opened_at, 1) if state != "closed" else None,
        "next_probe_s": round(open_until - now, 1) if state == "open" else None,
    }


def build_rows(reading: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per circuit/limit name from a source's reading (see the module docstring)."""
    now = float(reading["time"])
    by_name: dict[str, list[dict[str, Any]]] = {}
    for sample in reading["samples"]:
        by_name.setdefault(str(sample.get("name")), []).append(sample)
    names = sorted(set(reading["breakers"]) | set(reading["limits"]) | set(by_name))
    first = int(now) - WINDOW_S + 1
    rows = []
    for name in names:
        samples = by_name.get(name, [])
        row: dict[str, Any] = {"name": name, "state": None, "failures": None}
        row["open_for_s"] = row["next_probe_s"] = None
        rec = reading["breakers"].get(name)
        if rec is not None:
            row.update(_breaker_row(rec, now))
        else:  # the freshest replica's view
            views = [
                s["breaker"]
                for s in sorted(samples, key=lambda s: s.get("time", 0))
                if s.get("breaker")
            ]
            if views:
                view = views[-1]
                row.update(
                    {k: view.get(k) for k in ("state", "failures", "open_for_s", "next_probe_s")}
                )
        row["replicas"] = len({s.get("replica") for s in samples})
        limits = [s["limit"] for s in samples if s.get("limit")]
        in_flight = reading["limits"].get(name)
        row["in_flight"] = (
            in_flight
            if in_flight is not None
            else (sum(int(x.get("in_flight", 0)) for x in limits) if limits else None)
        )
        row["queue_depth"] = sum(int(x.get("waiting", 0)) for x in limits) if limits else None
        per_second = [[0, 0, 0] for _ in range(WINDOW_S)]
        for sample in samples:
            for second, calls, failures, degraded in sample.get("series", []):
                index = int(second) - first
                if 0 <= index < WINDOW_S:
                    cell = per_second[index]
                    cell[0] += int(calls)
                    cell[1] += int(failures)
                    cell[2] += int(degraded)
        calls = sum(c[0] for c in per_second)
        failures = sum(c[1] for c in per_second)
        degraded = sum(c[2] for c in per_second)
        row["calls_1m"] = calls
        row["error_rate_1m"] = round(failures / calls, 4) if calls else None
        row["degraded_rate_1m"] = round(degraded / calls, 4) if calls else None
        row["spark"] = sparkline((c[1] + c[2]) / c[0] if c[0] else None for c in per_second)
        for key in ("interrupted", "parse_failures"):
            row[key] = sum(_count((s.get("totals") or {}).get(key)) for s in samples)
        row["rate_limit"] = merge_rate_limits(samples)
        rows.append(row)
    return rows


def _count(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) else 0


_LEARNED = ("requests_per_s", "requests_source", "tokens_per_s", "tokens_source")


def merge_rate_limits(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The replicas' `rate_limit` entries as one view (see the module docstring)."""
    reports = [
        s["rate_limit"]
        for s in sorted(samples, key=lambda s: s.get("time", 0))
        if isinstance(s.get("rate_limit"), dict)
    ]
    if not reports:
        return None
    merged: dict[str, Any] = {
        key: sum(_count(r.get(key)) for r in reports)
        for key in ("paced", "rejected", "throttled_429")
    }
    merged["paced_seconds"] = round(sum(float(r.get("paced_seconds") or 0.0) for r in reports), 3)
    upstreams: dict[str, dict[str, Any]] = {}
    for report in reports:  # oldest first: the freshest replica's learned limits win
        for key, snap in (report.get("upstreams") or {}).items():
            if not isinstance(snap, dict):
                continue
            entry = upstreams.setdefault(str(key), {"waiting": 0})
            for field in _LEARNED:
                if snap.get(field) is not None:
                    entry[field] = snap[field]
            for field in ("requests_headroom", "tokens_headroom"):
                value = snap.get(field)
                if isinstance(value, (int, float)):
                    entry[field] = min(float(value), entry.get(field, 1.0))
            entry["waiting"] += _count(snap.get("waiting"))
    merged["upstreams"] = upstreams
    return merged


# -- rendering --------------------------------------------------------------------------------
_STATE_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.0f}s" if value < 120 else f"{value / 60:.1f}m"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.0f}%"


def _rate(value: Any) -> str:
    value = float(value)
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.3g}"


def _headroom(rate_limit: Any) -> str:
    """Each upstream's learned limits and the share of its burst free now, e.g.
    ``gpt-4o-mini 19.6 req/s 50% · 2.9k tok/s 80%`` (the first two upstreams)."""
    if not isinstance(rate_limit, dict):
        return "-"
    parts = []
    upstreams = rate_limit.get("upstreams") or {}
    for key, entry in list(upstreams.items())[:2]:
        model = str(key).split("|")[1] if str(key).count("|") >= 2 else ""
        cells = []
        for resource, unit in (("requests", "req"), ("tokens", "tok")):
            rate = entry.get(f"{resource}_per_s")
            if rate is None:
                continue
            room = entry.get(f"{resource}_headroom")
            cells.append(f"{_rate(rate)} {unit}/s" + ("" if room is None else f" {_pct(room)}"))
        if entry.get("waiting"):
            cells.append(f"{entry['waiting']} wait")
        if cells:
            parts.append(" ".join(([model] if model else []) + cells))
    more = len(upstreams) - 2
    text = " · ".join(parts) + (f" +{more}" if more > 0 else "")
    return text or ("paced" if rate_limit.get("paced") else "-")


def render(rows: list[dict[str, Any]], where: str, now: float, width: int = 200) -> Any:
    """A rich Table of the rows for a terminal `width` columns wide (the sparkline shows as
    many of the last 60 seconds as fit). rich is imported here: the `[watch]` extra."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    names = max((len(r["name"]) for r in rows), default=8)
    seconds = max(10, min(WINDOW_S, width - 86 - min(names, 30)))
    stamp = time.strftime("%H:%M:%S", time.gmtime(now))
    table = Table(
        title=f"rag-resilience watch · {where} · {stamp} UTC",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    spark_header = f"err+degr, last {seconds} s" if seconds >= 22 else f"last {seconds} s"
    for header, justify in (
        ("circuit", "left"),
        ("state", "left"),
        ("open", "right"),
        ("probe", "right"),
        ("calls", "right"),
        ("err", "right"),
        ("degr", "right"),
        (spark_header, "left"),
        ("flight", "right"),
        ("queue", "right"),
        ("repl", "right"),
        *(
            (("rate limit: learned, free", "left"),)
            if any(r.get("rate_limit") for r in rows)
            else ()
        ),
    ):
        wide = header == spark_header
        table.add_column(
            header,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=True,
            min_width=seconds if wide else None,
            max_width=seconds if wide else None,
        )
    for row in rows:
        state = row.get("state") or "-"
        table.add_row(
            row["name"],
            Text(state, style=_STATE_STYLE.get(state, "")),
            _seconds(row.get("open_for_s")),
            _seconds(row.get("next_probe_s")),
            str(row.get("calls_1m", 0)),
            _pct(row.get("error_rate_1m")),
            _pct(row.get("degraded_rate_1m")),
            Text(
                row.get("spark", "")[-seconds:],
                style="red" if (row.get("degraded_rate_1m") or 0) > 0.1 else "cyan",
            ),
            "-" if row.get("in_flight") is None else str(row["in_flight"]),
            "-" if row.get("queue_depth") is None else str(row["queue_depth"]),
            str(row.get("replicas", 0)),
            *((_headroom(row.get("rate_limit")),) if len(table.columns) > 11 else ()),
        )
    return table


# -- command line -----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rag-resilience watch",
        description="Live view of every circuit and limit, from a Redis store or a stats endpoint.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--redis", metavar="URL", help="a Redis store's URL (all replicas)")
    source.add_argument("--url", metavar="URL", help="an app's stats endpoint (GET, JSON)")
    parser.add_argument("--prefix", default="rag_resilience", help="the RedisStore's prefix")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes, in (0, 1]"
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines (default when piped)")
    parser.add_argument("--count", type=int, default=None, help="stop after this many refreshes")
    return parser


def main(argv: list[str] | None = None, *, sleep: Callable[[float], None] = time.sleep) -> int:
    args = _parser().parse_args(argv)
    if not 0 < args.interval <= 1.0:
        print(f"watch: --interval must be in (0, 1] seconds, got {args.interval}", file=sys.stderr)
        return 2
    if args.count is not None and args.count < 1:
        print(f"watch: --count must be >= 1, got {args.count}", file=sys.stderr)
        return 2
    source: Any = RedisSource(args.redis, args.prefix) if args.redis else HttpSource(args.url)
    as_json = args.json or not sys.stdout.isatty()
    if as_json:
        return _json_lines(source, args.interval, args.count, sleep)
    return _live(source, args.interval, args.count, sleep)


def _reading(source: Any) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return source.read(), None
    except Exception as exc:  # a source down: say so, keep watching
        return None, f"{type(exc).__name__}: {exc}"


def _json_lines(
    source: Any, interval: float, count: int | None, sleep: Callable[[float], None]
) -> int:
    done = 0
    while count is None or done < count:
        reading, error = _reading(source)
        line: dict[str, Any] = {"source": source.where}
        if reading is not None:
            line["time"] = reading["time"]
            line["circuits"] = build_rows(reading)
        else:
            line["time"] = time.time()
            line["error"] = error
        print(json.dumps(line), flush=True)
        done += 1
        if count is None or done < count:
            sleep(interval)
    return 0


def _live(source: Any, interval: float, count: int | None, sleep: Callable[[float], None]) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console()
    done = 0
    with Live(console=console, refresh_per_second=max(1.0, 1.0 / interval), screen=False) as live:
        try:
            while count is None or done < count:
                reading, error = _reading(source)
                if reading is None:
                    live.update(Text(f"{source.where}: {error}", style="red"))
                else:
                    rows = build_rows(reading)
                    live.update(render(rows, source.where, reading["time"], console.width))
                done += 1
                if count is None or done < count:
                    sleep(interval)
        except KeyboardInterrupt:
            pass
    return 0
