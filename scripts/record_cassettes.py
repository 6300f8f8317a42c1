"""Rewrite every cassette under cassettes/ (see rag_resilience.chaos.record).

python scripts/record_cassettes.py            # against the embedded chaos server
OPENAI_API_KEY=... python scripts/record_cassettes.py --real   # success cassettes, real API
"""

from __future__ import annotations

import sys

from rag_resilience.chaos.record import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
