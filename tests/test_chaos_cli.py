"""`rag-resilience serve` flags map onto Faults; bad flags fail with exit code 2."""

from __future__ import annotations

import pytest

from rag_resilience.chaos import Faults
from rag_resilience.chaos.cli import build_parser, faults_from_args, main


def test_flags_build_the_faults() -> None:
    args = build_parser().parse_args(
        [
            "--error-rate", "0.05", "--status", "503", "--error-rates", "429=0.1,insufficient_quota=0.01",
            "--retry-after", "2", "--fail-next", "3", "--latency", "0.01", "--stream-break-after", "4",
            "--rate-limit-rps", "50", "--max-concurrency", "20", "--concurrency-mode", "queue",
            "--endpoints", "embeddings,chat", "--clock-offset", "-1.5",
        ]
    )  # fmt: skip
    f = faults_from_args(args)
    assert f == Faults(
        error_rate=0.05,
        status=503,
        error_rates={"429": 0.1, "insufficient_quota": 0.01},
        retry_after=2.0,
        fail_next=3,
        fail_next_status=503,
        outage_status=503,
        latency=0.01,
        stream_break_after=4,
        rate_limit_rps=50.0,
        max_concurrency=20,
        concurrency_mode="queue",
        endpoints=("embeddings", "chat"),
        clock_offset=-1.5,
    )
    with pytest.raises(ValueError, match="clock_offset"):
        Faults(clock_offset=float("nan"))


def test_fail_next_status_defaults_to_status() -> None:
    f = faults_from_args(build_parser().parse_args(["--status", "429", "--fail-next", "1"]))
    assert f.fail_next_status == 429 and f.outage_status == 429


def test_invalid_flag_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "0", "--error-rate", "2"]) == 2
    assert "error_rate" in capsys.readouterr().err
    from rag_resilience.cli import main as top_main

    assert top_main(["serve", "--port", "0", "--status", "teapot"]) == 2
