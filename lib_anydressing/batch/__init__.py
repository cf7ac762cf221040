"""Catalog dressing: a manifest of jobs rendered headless, in one process or on Ray (see cli.py)."""
