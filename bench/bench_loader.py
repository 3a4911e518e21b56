"""Loader figures: listing a generated 2 GB sharded checkpoint, and BF16 / MXFP4 conversion.

Targets (issue 3): listing the tensors of a 2 GB sharded checkpoint in under 0.1 s with peak
memory growth under 50 MB; BF16 -> float32 and MXFP4 -> float32 at no less than half the
bandwidth of ``np.copyto`` of the output.

    python bench/bench_loader.py           # writes ~2.3 GB to a temporary directory
    python bench/bench_loader.py --gb 0.2  # quick look
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, publish, verdicts, versions

from kvq import kernels
from kvq.loader import load_safetensors
from kvq.timing import interleaved_medians, median_seconds

SHARDS = 8
TENSORS_PER_SHARD = 60

LISTING = """
import json, sys, time

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

from kvq.loader import load_safetensors
before = rss("VmRSS:")
start = time.perf_counter()
ckpt = load_safetensors(sys.argv[1])
names = list(ckpt)
shapes = [ckpt.info(name).shape for name in names]
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tensors": len(names), "bytes": ckpt.nbytes,
                  "peak_growth": rss("VmHWM:") - before}))
"""


def write_checkpoint(directory: Path, total_bytes: float) -> None:
    """A sharded float32 checkpoint with an index, like a Hugging Face one."""
    per_tensor = int(total_bytes / (SHARDS * TENSORS_PER_SHARD)) // 4
    rng = np.random.default_rng(0)
    base = rng.standard_normal(per_tensor, dtype=np.float32)
    weight_map = {}
    for shard in range(SHARDS):
        name = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {f"model.layers.{shard}.t{i}.weight": base for i in range(TENSORS_PER_SHARD)}
        save_file(tensors, directory / name)
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB")
    parser.add_argument("--convert-mb", type=int, default=128, help="float32 output MB")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_checkpoint(directory, args.gb * 1e9)
        runs = []
        for _ in range(5):
            result = subprocess.run(
                [sys.executable, "-c", LISTING, str(directory)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(result.stdout))
        listing = {
            key: float(np.median([run[key] for run in runs])) for key in ("seconds", "peak_growth")
        }
        tensors, stored = runs[0]["tensors"], runs[0]["bytes"]

        n = args.convert_mb * 2**20 // 4 // 32 * 32
        rng = np.random.default_rng(1)
        bf16 = rng.integers(0, 2**16, n, dtype=np.uint16)
        blocks = rng.integers(0, 256, n // 2, dtype=np.uint8)
        scales = rng.integers(100, 150, n // 32, dtype=np.uint8)
        save_file(
            {"experts_blocks": blocks.reshape(-1, 16), "experts_scales": scales},
            directory / "mx.safetensors",
        )
        out = np.empty(n, np.float32)
        source = np.empty(n, np.float32)
        mx = load_safetensors(directory / "mx.safetensors")
        times = interleaved_medians(
            {
                "np.copyto (float32 output)": lambda: np.copyto(out, source),
                "BF16 -> float32 kernel": lambda: kernels.bf16_to_f32(bf16, out.view(np.uint32)),
                "MXFP4 -> float32 kernel": lambda: kernels.mxfp4_to_f32(blocks, scales, out),
            },
            repeats=9,
        )
        times["MXFP4 checkpoint access (new array)"] = median_seconds(
            lambda: mx["experts"], repeats=5
        )

    copy = times["np.copyto (float32 output)"]
    rows = [
        [name, f"{t * 1e3:.1f}", f"{out.nbytes / t / 1e9:.1f}", f"{copy / t:.2f}"]
        for name, t in times.items()
    ]
    checks = [
        ("listing < 0.1 s", listing["seconds"], "<", 0.1),
        ("listing peak memory growth < 50 MB", listing["peak_growth"] / 1e6, "<", 50),
        ("BF16 >= 0.5x np.copyto bandwidth", copy / times["BF16 -> float32 kernel"], ">=", 0.5),
        ("MXFP4 >= 0.5x np.copyto bandwidth", copy / times["MXFP4 -> float32 kernel"], ">=", 0.5),
    ]

    def rate(name: str) -> str:
        return f"{out.nbytes / times[name] / 1e9:.1f} GB/s"

    copy_rate = f"{rate('np.copyto (float32 output)')} (np.copyto)"
    figures = {  # check name -> (kvq figure, peer figure), in the order of checks
        checks[0][0]: (f"{listing['seconds'] * 1e3:.1f} ms", "-"),
        checks[1][0]: (f"{listing['peak_growth'] / 1e6:.1f} MB", "-"),
        checks[2][0]: (rate("BF16 -> float32 kernel"), copy_rate),
        checks[3][0]: (rate("MXFP4 -> float32 kernel"), copy_rate),
    }
    lines = [
        f"# bench_loader: {stored / 1e9:.2f} GB checkpoint in {SHARDS} shards, {tensors} tensors; "
        f"conversions to {out.nbytes / 2**20:.0f} MiB of float32",
        f"{machine()}; {versions('safetensors')}",
        "",
        f"Listing (new process, headers only, median of 5): {listing['seconds'] * 1e3:.1f} ms, "
        f"peak RSS growth {listing['peak_growth'] / 1e6:.1f} MB.",
        "",
        markdown_table(
            ["conversion", "ms", "GB/s of float32 output", "bandwidth / np.copyto"], rows
        ),
        "",
    ]
    lines += verdicts(checks)
    publish("bench_loader", lines, figures)


if __name__ == "__main__":
    main()
