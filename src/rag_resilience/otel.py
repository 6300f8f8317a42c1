"""OpenTelemetry for rag-resilience (extra ``[otel]``): metrics and traces.

    from rag_resilience import add_listener
    from rag_resilience.otel import OTelListener, instrument
    add_listener(OTelListener())   # metrics: see rag_resilience.otel_metrics
    instrument()                   # traces: see rag_resilience.otel_traces

This module re-exports both; the instruments, span names and attributes are documented
in `rag_resilience.telemetry` (metrics) and `rag_resilience.otel_traces` (spans).
"""

from __future__ import annotations

from .otel_metrics import OTelListener
from .otel_traces import genai_attributes, instrument, is_instrumented, trace_policy, uninstrument

__all__ = [
    "OTelListener",
    "genai_attributes",
    "instrument",
    "is_instrumented",
    "trace_policy",
    "uninstrument",
]
