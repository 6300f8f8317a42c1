"""`python -m rag_resilience.chaos [flags]`: same as `rag-resilience serve`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
