"""`rag-resilience bench`: run the chaos benchmark (benchmarks/chaos.py) of a source checkout.

The benchmark compares us with other libraries (LangChain, LlamaIndex, tenacity, pybreaker),
so it lives in the repository, not in the wheel. This entry point finds the script next to
the package's source tree (or under the current directory) and runs it with the given
arguments; from an installed wheel without the repository it says where to get it.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

__all__ = ["find_script", "main"]

_SCRIPT = Path("benchmarks") / "chaos.py"


def find_script(cwd: Path | None = None) -> Path | None:
    """benchmarks/chaos.py of the checkout this package runs from, else under `cwd`."""
    here = Path(__file__).resolve()
    candidates = [parent / _SCRIPT for parent in here.parents[:3]]
    candidates.append((cwd or Path.cwd()) / _SCRIPT)
    for path in candidates:
        if path.is_file():
            return path
    return None


def main(argv: list[str] | None = None) -> int:
    """Run benchmarks/chaos.py with `argv` (e.g. ``["--quick", "--scenario", "outage"]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    script = find_script()
    if script is None:
        print(
            "rag-resilience bench: benchmarks/chaos.py not found. The chaos benchmark ships with "
            "the source repository, not the wheel: clone it and run `rag-resilience bench` (or "
            "`python benchmarks/chaos.py`) from the checkout.",
            file=sys.stderr,
        )
        return 2
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))
    try:
        namespace = runpy.run_path(str(script), run_name="rag_resilience_bench")
        result = namespace["main"](args)
    except SystemExit as exc:  # argparse --help / usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return int(result or 0)
