"""`rag-resilience serve` / `python -m rag_resilience.chaos`: run the chaos server in the foreground."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .faults import Faults
from .server import ChaosServer, FaultEvent

__all__ = ["build_parser", "faults_from_args", "main"]


def _error_rates(text: str) -> dict[str, float]:
    rates: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, rate = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KIND=RATE, got {item!r}")
        rates[kind.strip()] = float(rate)
    return rates


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rag-resilience serve",
        description="OpenAI-compatible fault-injecting server on loopback. Change faults at run "
        "time with POST /_chaos/faults (JSON), read GET /_chaos/stats, POST /_chaos/reset.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default 8000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault RNG")
    p.add_argument("--embedding-dim", type=int, default=1536)
    p.add_argument("-q", "--quiet", action="store_true", help="do not print each injected fault")
    f = p.add_argument_group("faults")
    f.add_argument("--error-rate", type=float, default=0.0, help="probability of an error")
    f.add_argument(
        "--status",
        default="503",
        help="error kind for --error-rate: 500 502 503 504 429 400 401, or a name "
        "(rate_limit, insufficient_quota, context_length_exceeded, invalid_api_key, ...)",
    )
    f.add_argument("--error-rates", type=_error_rates, default={}, help='e.g. "429=0.1,500=0.05"')
    f.add_argument("--retry-after", type=float, default=None, help="seconds advertised on 429/503")
    f.add_argument("--retry-after-header", choices=["both", "seconds", "ms"], default="both")
    f.add_argument("--outage", action="store_true", help="fail every request")
    f.add_argument("--outage-status", default=None, help="default: --status")
    f.add_argument("--fail-next", type=int, default=0, help="fail the next N requests")
    f.add_argument("--fail-next-status", default=None, help="default: --status")
    f.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    f.add_argument("--latency-jitter", type=float, default=0.0)
    f.add_argument("--stall", action="store_true", help="never answer (until cleared)")
    f.add_argument("--stall-rate", type=float, default=0.0)
    f.add_argument("--drop-rate", type=float, default=0.0, help="close without a response")
    f.add_argument("--drop-next", type=int, default=0)
    f.add_argument(
        "--stream-break-after", type=int, default=None, help="cut streams after K events"
    )
    f.add_argument("--rate-limit-rps", type=float, default=None, help="server-side limit, req/s")
    f.add_argument("--rate-limit-burst", type=int, default=None)
    f.add_argument("--rate-limit-tpm", type=float, default=None, help="tokens per minute per key")
    f.add_argument("--rate-limit-token-burst", type=int, default=None)
    f.add_argument(
        "--rate-limit-headers", choices=("openai", "azure", "anthropic", "none"), default="openai"
    )
    f.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        help="seconds the server's clock runs ahead (negative: behind), in RFC 3339 resets",
    )
    f.add_argument("--max-concurrency", type=int, default=None)
    f.add_argument("--concurrency-mode", choices=["reject", "queue"], default="reject")
    f.add_argument(
        "--endpoints",
        default=None,
        help="comma list of endpoints faults apply to: embeddings,chat,models",
    )
    return p


def faults_from_args(args: argparse.Namespace) -> Faults:
    """Build a `Faults` from parsed flags (ValueError on an invalid combination)."""
    fields: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "error_rate", "status", "error_rates", "retry_after", "retry_after_header",
            "outage", "outage_status", "fail_next", "fail_next_status", "latency",
            "latency_jitter", "stall", "stall_rate", "drop_rate", "drop_next",
            "stream_break_after", "rate_limit_rps", "rate_limit_burst", "rate_limit_tpm",
            "rate_limit_token_burst", "rate_limit_headers", "clock_offset", "max_concurrency",
            "concurrency_mode",
        )
    }  # fmt: skip
    for name in ("outage_status", "fail_next_status"):
        if fields[name] is None:
            fields[name] = fields["status"]
    for name in ("status", "outage_status", "fail_next_status"):
        if isinstance(fields[name], str) and fields[name].strip().isdigit():
            fields[name] = int(fields[name])
    if args.endpoints:
        fields["endpoints"] = tuple(e.strip() for e in args.endpoints.split(",") if e.strip())
    return Faults(**fields)


def _print_fault(event: FaultEvent) -> None:
    print(f"fault {event}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        faults = faults_from_args(args)
        server = ChaosServer(
            seed=args.seed,
            host=args.host,
            port=args.port,
            faults=faults,
            embedding_dim=args.embedding_dim,
            on_fault=None if args.quiet else _print_fault,
        )
        server.start()
    except (ValueError, OSError) as exc:
        print(f"rag-resilience serve: {exc}", file=sys.stderr)
        return 2
    active = {k: v for k, v in faults.to_dict().items() if v != Faults().to_dict()[k]}
    print(f"chaos server listening on {server.base_url}  (seed {args.seed})", flush=True)
    print(f"faults: {json.dumps(active) if active else 'none'}", flush=True)
    print(
        f"control: POST {server.url}/_chaos/faults  GET {server.url}/_chaos/stats  Ctrl-C stops",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    stats = server.stats()
    print(
        f"\nstopped: {stats['requests']} requests, {stats['successes']} successes, "
        f"faults {json.dumps(stats['faults'])}",
        flush=True,
    )
    return 0
