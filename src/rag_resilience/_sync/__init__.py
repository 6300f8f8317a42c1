"""Generated from `../_async` by scripts/unasync.py: edit the async source, then run
`python scripts/unasync.py` (the test suite checks that the two agree)."""
