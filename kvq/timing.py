"""Wall-clock timing with warm-up and medians, for the demo and bench/ (noisy shared machines)."""

import time
from collections.abc import Callable

import numpy as np


def median_seconds(run: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def interleaved_medians(
    runs: dict[str, Callable[[], object]], repeats: int = 9, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each run, timing them in turn (round robin) so that drift in the
    machine's load affects all alike; ratios between them are what to read."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}
