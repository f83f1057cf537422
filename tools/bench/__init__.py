"""Benchmarks: each measures a figure beside a reference from the same run (docs/benchmarks.md)."""

import json
from pathlib import Path


def write_results(path: Path, results: dict) -> None:
    """A benchmark's figures as JSON (under build/bench/ by default), for docs/benchmarks.md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
