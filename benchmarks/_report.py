"""Writing a benchmark's results: JSON for machines, a markdown table for the docs."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable


def command(script: str) -> str:
    """The command line that produced the results, as the docs quote it."""
    return " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]])


def write_report(out: str, report: dict, markdown: Callable[[dict], str]) -> None:
    """Write ``out.json`` and ``out.md`` and print the markdown."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as handle:
        json.dump(report, handle, indent=2)
    with open(out + ".md", "w") as handle:
        handle.write(markdown(report))
    print(markdown(report))
