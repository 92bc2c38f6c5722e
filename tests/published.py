"""The published cache numbers as the team copied them from their sources (../shared/cache-facts.md,
beside the repository in this workspace, each table naming its repository, commit and line): what
the presets in caching/ are checked against, so that a preset is compared with its source rather
than with numbers retyped into a test. A checkout without that file skips these checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

FACTS = Path(__file__).resolve().parents[2] / "shared" / "cache-facts.md"


def facts() -> str:
    if not FACTS.is_file():
        pytest.skip(f"{FACTS} is not beside this checkout (the team's copy of the published numbers)")
    return FACTS.read_text()


def teacache_table() -> dict[tuple[str, str], tuple[tuple[float, ...], str]]:
    """§3.1's table of TeaCache hyperparameters: (model, mode) -> (coefficients, boundary steps)."""
    rows = {}
    for line in facts().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[2].startswith("`["):
            rows[cells[0], cells[1]] = (tuple(float(v) for v in cells[2].strip("`[]").split(",")), cells[3])
    return rows


def magcache_arrays() -> dict[str, tuple[float, ...]]:
    """Appendix A: per heading, the ratios as the authors' code reads them (the 1.0s it prepends
    first, then the listed values)."""
    text = facts()
    out = {}
    for heading, prefix, values in re.findall(r"^#### (.+?)\n.*?\[1\.0\]\*(\d+).*?```\n\[(.*?)\]\n```",
                                              text[text.index("## Appendix A"):], flags=re.S | re.M):
        out[heading.split(" (")[0]] = (1.0,) * int(prefix) + tuple(float(v) for v in values.split(","))
    return out
