"""Fuzz kvq.load_safetensors for longer than the unit run does, and report what happened.

The inputs, the contract (a result or kvq.LoaderError; nothing else, no crash, no allocation
out of proportion to the file) and the harness are those of tests/robustness/test_fuzz_loader.py
(strategies in tests/robustness/loader_fuzz.py). The time is shared between the input kinds as
in the tests; failures are recorded with their seed and the run goes on.

    python bench/fuzz_loader.py --seconds 600
    python bench/fuzz_loader.py --seconds 60 --kinds mutated_file sharded --seed 7

Exit status 1 when any input broke the contract.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.robustness.loader_fuzz import SHARES, STRATEGIES, Report, fuzz


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="total time (default 180)")
    parser.add_argument("--kinds", nargs="+", choices=list(STRATEGIES), default=list(SHARES))
    parser.add_argument("--seed", type=int, default=None, help="base seed (default random)")
    args = parser.parse_args(argv)
    base = random.randrange(2**32) if args.seed is None else args.seed
    total = sum(SHARES[k] for k in args.kinds)
    print(f"fuzzing kvq.load_safetensors for {args.seconds:.0f} s, base seed {base}")
    reports: dict[str, Report] = {}
    start = time.monotonic()
    for index, kind in enumerate(args.kinds):
        seconds = args.seconds * SHARES[kind] / total
        last = [time.monotonic()]

        def progress(report: Report, kind=kind, last=last) -> None:
            if time.monotonic() - last[0] >= 10:
                last[0] = time.monotonic()
                print(f"  {kind}: {report.tried} inputs, {len(report.failures)} failures")

        report = fuzz(
            kind,
            seconds,
            base + 1_000_003 * index,
            stop_on_failure=False,
            on_batch=progress,
        )
        reports[kind] = report
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items()))
        print(
            f"{kind:>13}: {report.tried:6d} inputs in {report.seconds:6.1f} s "
            f"({report.tried / max(report.seconds, 1e-9):6.1f}/s; {outcomes}); "
            f"{len(report.failures)} failures"
        )
        for failure in report.failures:
            print(f"    FAILURE {failure}")
    tried = sum(r.tried for r in reports.values())
    failures = sum(len(r.failures) for r in reports.values())
    elapsed = time.monotonic() - start
    print(f"total: {tried} inputs in {elapsed:.1f} s, {failures} failures (base seed {base})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
