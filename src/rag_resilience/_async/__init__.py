"""The async source of the drivers; `../_sync` is generated from it (scripts/unasync.py)."""
