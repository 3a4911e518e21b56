"""Shared helpers for the benchmark scripts: peer imports, table printing, result files."""

import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

# The checkout these scripts live in goes ahead of an installed kvq, which may be an older copy
# (a script's own folder, bench/, is what Python puts first on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def optional(module: str):
    """Import a peer package, or return None (the benchmark reports it as skipped)."""
    try:
        return importlib.import_module(module)
    except Exception:  # a peer may fail to import for reasons beyond ImportError
        return None


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, text: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(text + "\n")
    return path


def publish(name: str, lines: list[str], figures: dict) -> None:
    """Write ``<name>.json`` (the figures behind each target, for run_all's summary) and
    ``<name>.md`` (the report ``lines``) under bench/results/, and print the report."""
    save(f"{name}.json", json.dumps(figures, indent=1))
    report = "\n".join(lines)
    print(report)
    print(f"\n(saved to {save(f'{name}.md', report)}; {time.strftime('%Y-%m-%d %H:%M')})")


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def versions(*distributions: str) -> str:
    """'numpy 2.4.6, mlx 0.32.4, ...' for the installed distributions among those named."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("numpy", "numba", *distributions):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(parts)


def verdicts(checks) -> list[str]:
    """'- PASS name: value (target op target)' lines for (name, value, op, target) checks."""
    compare = {
        "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b,
        "<": lambda a, b: a < b,
        "==": lambda a, b: a == b,
    }
    return [
        f"- {'PASS' if compare[op](value, target) else 'MISS'} {name}: {value:.3g} "
        f"(target {op} {target:.3g})"
        for name, value, op, target in checks
    ]
