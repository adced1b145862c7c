"""Problems found while ingesting data: reported per file with a reason, never raised as a traceback."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    item: str  # the file (or CSV row / folder) the problem is about
    reason: str  # one line a user can act on
    stage: str  # "read" (CSV/folder parsing), "image" (decoding), "cache"


class DataError(ValueError):
    """A whole source cannot be used (e.g. a CSV missing a required column); nothing from it was read."""


def write_problems(problems: Iterable[Problem], path: Path) -> Path:
    """Write the machine-readable list (CSV: item, reason, stage), even when empty, so tools can rely on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(Problem)]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for p in problems:
            w.writerow(asdict(p))
    return path


def summarise(problems: list[Problem], examples: int = 3) -> str:
    """A short human summary grouped by reason, with a few example files per reason."""
    if not problems:
        return "no problems"
    by_reason: dict[str, list[str]] = {}
    for p in problems:
        by_reason.setdefault(p.reason, []).append(p.item)
    counts = Counter({r: len(v) for r, v in by_reason.items()})
    lines = [f"{len(problems)} item(s) dropped:"]
    for reason, n in counts.most_common():
        items = by_reason[reason]
        shown = ", ".join(items[:examples]) + (f", ... (+{n - examples} more)" if n > examples else "")
        lines.append(f"  {n:>6} x {reason}: {shown}")
    return "\n".join(lines)
