"""A fault-injecting, OpenAI-compatible HTTP server on loopback, and its recorded cassettes.

>>> from rag_resilience.chaos import ChaosServer
>>> with ChaosServer(seed=7, error_rate=0.1, status=503) as server:
...     client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
"""

from __future__ import annotations

from .faults import ERROR_KINDS, ErrorKind, Faults
from .server import ChaosServer, FaultEvent

__all__ = ["ERROR_KINDS", "ChaosServer", "ErrorKind", "FaultEvent", "Faults"]
