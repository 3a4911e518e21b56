"""Mutation check: each named mutant of kvq must make some of its tests fail.

    python -m tests.mutation            # every mutant (about 6 minutes on 2 cores)
    python -m tests.mutation -k search  # mutants whose name contains "search"
    python -m tests.mutation --list     # names, files and tests

For each mutant: copy the working tree (without .git) to a temporary directory, apply the
mutant's textual patch there (each snippet must occur exactly once, or the run stops with
"mutant X: pattern not found"), and run ``pytest -x -q`` on the mutant's test files in the
copy, with a fresh NUMBA_CACHE_DIR (so no kernel compiled from unmutated source is reused).
A mutant is *caught* when pytest fails. First the same tests run once on an unmutated copy,
which must pass. Exit status 0 only when the baseline passes and every mutant is caught.

``--noop`` adds a control mutant that changes nothing but a comment: it must survive, so the
run must then exit 1 (a check of the check).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file under the repository root
    edits: tuple[tuple[str, str], ...]  # (snippet, replacement), each snippet exactly once
    tests: tuple[str, ...]  # pytest arguments (files or node ids), run with -x -q
    what: str


MUTANTS = (
    Mutant(
        "search-f16-scale-min-swapped",
        "kvq/kernels/search.py",
        (
            (
                "return float16_round_up(scale), float16_round_down(lowest)",
                "return float16_round_down(lowest), float16_round_up(scale)",
            ),
        ),
        ("tests/test_search.py",),
        "search's float16 branch returns (min, scale) for (scale, min): search is a no-op",
    ),
    Mutant(
        "double-quant-step-twice-as-coarse",
        "kvq/kernels/second_level.py",
        (("step = _step_up(widest / sub)", "step = _step_up(2 * widest / sub)"),),
        ("tests/test_double_quant.py",),
        "the float16 super-group scale step d is twice what the groups need",
    ),
    Mutant(
        "search-short-group-padded",
        "kvq/kernels/search.py",
        (
            (
                "prange(scales.shape[0]):\n        count = last_count if",
                "prange(scales.shape[0]):\n        count = block_size if",
            ),
        ),
        ("tests/test_search.py",),
        "search fits a row's short last group with its padding, not its real values alone",
    ),
    Mutant(
        "search-short-group-off-by-one",
        "kvq/kernels/search.py",
        (
            (
                "prange(scales.shape[0]):\n        count = last_count if (b + 1) % row_blocks",
                "prange(scales.shape[0]):\n        count = last_count if b % row_blocks",
            ),
        ),
        ("tests/test_search.py",),
        "off-by-one group index: the first group of each row is taken as the short one",
    ),
    Mutant(
        "dequantize-min-of-previous-group",
        "kvq/kernels/blockwise.py",
        (
            (
                "lowest = mins[b]\n        if block_size == SIMD_BLOCK:",
                "lowest = mins[b - 1]\n        if block_size == SIMD_BLOCK:",
            ),
        ),
        ("tests/test_quantize.py::test_codes_and_params_equal_reference",),
        "off-by-one group index: dequantize takes each block's min from the block before",
    ),
    Mutant(
        "quantize-floor-for-rint",
        "kvq/kernels/blockwise.py",
        (
            (
                "level = np.rint((block[i] - lowest) * inverse)\n"
                "            block_codes[i] = np.uint8(min(level, levels))",
                "level = np.floor((block[i] - lowest) * inverse)\n"
                "            block_codes[i] = np.uint8(min(level, levels))",
            ),
        ),
        ("tests/test_quantize.py::test_codes_and_params_equal_reference",),
        "quantize (groups other than 32) rounds codes down instead of to nearest",
    ),
    Mutant(
        "encode-floor-for-rint",
        "kvq/kernels/blockwise.py",
        (
            (
                "level = np.rint((block[i] - lowest) * inverse)\n"
                "                block_codes[i] = np.uint8(min(max(",
                "level = np.floor((block[i] - lowest) * inverse)\n"
                "                block_codes[i] = np.uint8(min(max(",
            ),
        ),
        ("tests/test_double_quant.py",),
        "encode (double_quant and search) rounds codes down instead of to nearest",
    ),
    Mutant(
        "attention-causal-diagonal-dropped",
        "kvq/kernels/attention.py",
        (("hi = min(row_last[r] - start + 1, width)", "hi = min(row_last[r] - start, width)"),),
        ("tests/test_attention.py",),
        "causal mask position < p instead of <= p: a query no longer sees its own token",
    ),
    Mutant(
        "attention-first-position-dropped",
        "kvq/kernels/attention.py",
        (("lo = max(row_first[r] - start, 0)", "lo = max(row_first[r] - start + 1, 0)"),),
        ("tests/test_attention.py",),
        "window bound shifted: each query loses its oldest visible position",
    ),
    Mutant(
        "unpack-scale-min-swapped",
        "kvq/kernels/_unpack.py",
        (
            (
                "_splat(builder, scale_value, count, _f32),\n"
                "                    values,\n"
                "                    _splat(builder, lowest_value, count, _f32),",
                "_splat(builder, lowest_value, count, _f32),\n"
                "                    values,\n"
                "                    _splat(builder, scale_value, count, _f32),",
            ),
        ),
        ("tests/test_attention.py",),
        "the packed-code unpacker computes scale + min * code",
    ),
    Mutant(
        "attention-decode-scale-min-swapped",
        "kvq/kernels/attention.py",
        (("values_out[d] = m + s * codes_out[d]", "values_out[d] = s + m * codes_out[d]"),),
        ("tests/test_attention.py",),
        "attention's per-token decode computes scale + min * code",
    ),
    Mutant(
        "attention-vector-decode-scale-min-swapped",
        "kvq/kernels/attention.py",
        (
            (
                "s = scales[t * groups + g]\n                m = mins[t * groups + g]",
                "m = scales[t * groups + g]\n                s = mins[t * groups + g]",
            ),
        ),
        ("tests/test_attention_paths.py",),
        "attention's vector decode of per-token rows (any chunk) swaps scale and min",
    ),
    Mutant(
        "values-codes-centre-dropped",
        "kvq/kernels/_tiles.py",
        (
            (
                "group_centres[j] = builder.fadd(lowest, builder.fmul(scale, middle))",
                "group_centres[j] = lowest",
            ),
        ),
        ("tests/test_attention.py",),
        "values read from their codes take the codes centred but add the plain min",
    ),
    Mutant(
        "scores-codes-centre-dropped",
        "kvq/kernels/attention.py",
        (
            (
                "offset += q[r, d] * (channel_mins[d] + channel_scales[d] * halves[d])",
                "offset += q[r, d] * channel_mins[d]",
            ),
        ),
        ("tests/test_attention.py",),
        "scores from per-channel key codes take the codes centred but add q . min",
    ),
    Mutant(
        "scores-tokens-group-zero",
        "kvq/kernels/_tiles.py",
        (
            (
                "param = builder.add(first_param, builder.sdiv(j, runs_v))",
                "param = builder.add(first_param, ir.Constant(_i64, 0))",
            ),
        ),
        ("tests/test_attention_paths.py",),
        "scores from per-token key codes use the token's first group's params for every run",
    ),
    Mutant(
        "token-params-min-offset-dropped",
        "kvq/kernels/attention.py",
        (
            (
                "np.float32(-MIN_OFFSET) * step_min, staged, SUPER_GROUPS",
                "np.float32(0.0) * step_min, staged, SUPER_GROUPS",
            ),
        ),
        ("tests/test_attention.py", "tests/test_attention_paths.py"),
        "per-token 6-bit min codes staged a head at a time decode without their offset of 32 "
        "steps",
    ),
    Mutant(
        "block-params-min-offset-dropped",
        "kvq/kernels/attention.py",
        (
            (
                "np.float32(-MIN_OFFSET) * step_min, mins, out_at + at",
                "np.float32(0.0) * step_min, mins, out_at + at",
            ),
        ),
        ("tests/test_attention.py", "tests/test_attention_paths.py"),
        "per-token 6-bit min codes staged a block at a time decode without their offset",
    ),
    Mutant(
        "token-codes-side-swapped",
        "kvq/kernels/attention.py",
        (("flat = k_flat if side == 0 else v_flat", "flat = v_flat if side == 0 else k_flat"),),
        ("tests/test_attention_paths.py",),
        "the per-token params and offsets the tiles read come from the other stream's arrays",
    ),
    Mutant(
        "ring-drops-a-chunk-early",
        "kvq/kvcache.py",
        (
            (
                "first = min(chunks, max(0, (appended - window) // chunk))",
                "first = min(chunks, max(0, (appended - window) // chunk + 1))",
            ),
        ),
        ("tests/test_ring.py",),
        "the windowed ring drops a chunk that still holds tokens inside the window",
    ),
    Mutant(
        "vector-decoder-takes-ragged-groups",
        "kvq/kernels/attention.py",
        (("        and dim % group == 0\n", ""),),
        ("tests/test_attention.py::test_per_token_groups_ragged_within_a_token",),
        "per-token rows whose last group is ragged (64 + 32) go to the 32-code vector decoder",
    ),
    Mutant(
        "hadamard-butterfly-swapped",
        "kvq/kernels/attention.py",
        (("x[j + h] = a - b", "x[j + h] = b - a"),),
        ("tests/test_attention.py",),
        "the kernel's fast Walsh-Hadamard transform (q and output rotations) swaps a butterfly",
    ),
    Mutant(
        "tile-pass-stores-at-its-own-columns",
        "kvq/kernels/_tiles.py",
        (
            (
                "at = builder.add(base, ir.Constant(_i64, 16 * column))",
                "at = builder.add(base, ir.Constant(_i64, 16 * c))",
            ),
        ),
        ("tests/test_tiles.py",),
        "a float tile's later passes store their columns at the first pass's place",
    ),
    Mutant(
        "values-codes-pass-centre-of-first-run",
        "kvq/kernels/_tiles.py",
        (
            (
                "_splat(builder, updated_sums[r, c // 2])",
                "_splat(builder, updated_sums[r, runs[0]])",
            ),
        ),
        ("tests/test_tiles.py",),
        "values from codes add the centre sum of a pass's first 32-column run to every column",
    ),
    Mutant(
        "tile-width-switch-all-to-last",
        "kvq/kernels/_tiles.py",
        (
            (
                "switch.add_case(ir.Constant(_i64, width), cases[width])",
                "switch.add_case(ir.Constant(_i64, width), cases[CODE_WIDTHS[-1]])",
            ),
        ),
        ("tests/test_tiles.py",),
        "the code tiles decode every width as 3-bit codes",
    ),
    Mutant(
        "output-unrotated-without-signs",
        "kvq/kernels/attention.py",
        (("row[d] *= signs[d] * factor", "row[d] *= factor"),),
        ("tests/test_attention.py",),
        "the values' inverse rotation of each output row leaves out the random signs",
    ),
    Mutant(
        "channel-runs-all-start-at-zero",
        "kvq/kernels/attention.py",
        (
            (
                "first = 0 if run == 0 else k.channel_runs[head, run - 1]",
                "first = 0",
            ),
        ),
        ("tests/test_channel_bits.py::test_attention_matches_reference",),
        "scores from key codes of several widths read every run from the head's first channel",
    ),
    Mutant(
        "channel-run-takes-the-widest-width",
        "kvq/kernels/attention.py",
        (
            (
                "width_bits = k.channel_bits[head * dim + first]",
                "width_bits = k.channel_bits[head * dim]",
            ),
        ),
        ("tests/test_channel_bits.py::test_attention_matches_reference",),
        "each run of key codes is decoded at its head's widest width",
    ),
    Mutant(
        "channel-decode-ignores-the-channel-byte",
        "kvq/kernels/attention.py",
        (
            (
                "byte = row_byte + view.channel_at[head * dim + d]",
                "byte = row_byte + view.channel_at[head * dim]",
            ),
        ),
        ("tests/test_channel_bits.py::test_attention_matches_reference",),
        "keys of several widths decoded to scratch all read their head's first channel",
    ),
    Mutant(
        "second-level-min-codes-round-up",
        "kvq/kernels/second_level.py",
        (
            (
                "code = np.float32(np.floor(mins[g] / step_min))",
                "code = np.float32(np.ceil(mins[g] / step_min))",
            ),
        ),
        ("tests/test_double_quant.py",),
        "second-level min codes round up, so a grid can start above its group's min",
    ),
    Mutant(
        "second-level-subnormal-step-zero",
        "kvq/kernels/second_level.py",
        (("if step == 0 and widest > 0:", "if step == 0 and widest > 0 and False:"),),
        ("tests/test_double_quant.py",),
        "a subnormal-wide super-group keeps a step of 0 (its values above their grid)",
    ),
    Mutant(
        "hadamard-lanes-signs-swapped",
        "kvq/kernels/attention.py",
        (("x[j + lane] = a + b", "x[j + lane] = b + b"),),
        ("tests/test_attention.py::test_rotations_of_every_power_of_two",),
        "the Walsh-Hadamard stages from 8 on lose a term of their sums: not H any more",
    ),
    Mutant(
        "residual-keys-scored-one-late",
        "kvq/kernels/attention.py",
        (
            (
                "k.residual, head, q, scores, rows, max(0, k_residual), width, k_residual",
                "k.residual, head, q, scores, rows, max(0, k_residual) + 1, width, k_residual",
            ),
        ),
        ("tests/test_attention_paths.py", "tests/test_attention.py"),
        "a block's first float32 key after its whole chunks keeps a stale score",
    ),
    Mutant(
        "residual-values-from-the-wrong-token",
        "kvq/kernels/attention.py",
        (
            (
                "v.residual, head, scores, acc, rows, max(0, v_coded), width, v_residual",
                "v.residual, head, scores, acc, rows, max(0, v_coded), width, v_residual - 1",
            ),
        ),
        ("tests/test_attention_paths.py", "tests/test_attention.py"),
        "the values waiting for their chunk are read one token later than they sit",
    ),
    Mutant(
        "token-params-widened-one-lane-short",
        "kvq/kernels/attention.py",
        (("lanes = min(16, hi - lo - i)", "lanes = min(16, hi - lo - i) - 1"),),
        ("tests/test_attention_paths.py", "tests/test_attention.py"),
        "a token's last float16/float32 group param is left zero (the masked load one short)",
    ),
    Mutant(
        "channel-params-widened-from-the-next-channel",
        "kvq/kernels/attention.py",
        (
            (
                "widen_halves(flat.p0, at + i, channel_scales, i, lanes)",
                "widen_halves(flat.p0, at + i + 1, channel_scales, i, lanes)",
            ),
        ),
        ("tests/test_attention_paths.py", "tests/test_attention.py"),
        "kivi's per-channel float16 key scales are read one channel late",
    ),
    Mutant(
        "block-params-a-token-one-short",
        "kvq/kernels/attention.py",
        (("out_at = t * stride - base", "out_at = t * (stride - 1) - base"),),
        ("tests/test_attention_paths.py", "tests/test_attention.py"),
        "a block's staged params overlap from one token to the next",
    ),
    Mutant(
        "block-params-super-group-unaligned",
        "kvq/kernels/attention.py",
        (("base = lo // SUPER_GROUPS * SUPER_GROUPS", "base = lo"),),
        ("tests/test_attention_paths.py", "tests/test_attention.py"),
        "a task's first head's second-level params decoded from mid super-group",
    ),
    Mutant(
        "turned-keys-second-channel-sign",
        "kvq/kernels/_tiles.py",
        (
            (
                "builder.store(builder.fadd(builder.fmul(b, c), builder.fmul(a, s)), b_pointer",
                "builder.store(builder.fsub(builder.fmul(b, c), builder.fmul(a, s)), b_pointer",
            ),
        ),
        ("tests/test_attention_paths.py", "tests/test_pre_rope.py"),
        "pre-RoPE keys' second channel of each pair turned the wrong way, 16 tokens at a time",
    ),
    Mutant(
        "scores-last-tokens-dropped",
        "kvq/kernels/attention.py",
        (("        tiled_width += 32", "        width = tiled_width"),),
        ("tests/test_attention_paths.py", "tests/test_attention.py"),
        "the scores of a scratch block's last width % 32 tokens are left as they were",
    ),
    Mutant(
        "single-split-merge-unweighted",
        "kvq/kernels/attention.py",
        (("weight = weights[0] * scale", "weight = scale"),),
        ("tests/test_sink_tokens.py", "tests/test_attention.py"),
        "one split's partial is not weighted by exp(max - top) against a GPT-OSS sink logit",
    ),
    Mutant(
        "splits-merged-unweighted",
        "kvq/kernels/attention.py",
        (
            (
                "a += weights[split] * np.float64(part_acc[head * splits + split, r, d])",
                "a += np.float64(part_acc[head * splits + split, r, d])",
            ),
        ),
        ("tests/test_attention_paths.py", "tests/test_attention.py"),
        "the splits' partial outputs are summed without their exp(max - top) weights",
    ),
    Mutant(
        "decode-step-token-unrotated",
        "kvq/kernels/append.py",
        (("rotate_row(new[h, 0], rotation, rotated[h])", "rotated[h, :] = new[h, 0]"),),
        ("tests/test_kvcache.py::test_decode_steps_store_what_one_append_stores",),
        "a decode step's token waits in the residual unrotated, in a rotated stream",
    ),
    Mutant(
        "decode-step-completes-without-its-token",
        "kvq/kvcache.py",
        (
            (
                "self.buffer[:, : self.pending.shape[1] + 1], self.sinks, self.appended + 1",
                "self.buffer[:, : self.pending.shape[1]], self.sinks, self.appended + 1",
            ),
        ),
        ("tests/test_kvcache.py::test_decode_steps_store_what_one_append_stores",),
        "the chunk a decode step completes is quantized without the step's own token",
    ),
    Mutant(
        "per-channel-values-last-tokens-untransposed",
        "kvq/kernels/attention.py",
        (
            (
                "for i0 in range(t, t + v_chunk, 16):  # 16 x 16",
                "for i0 in range(t, t + v_chunk - 16, 16):  # 16 x 16",
            ),
        ),
        ("tests/test_attention_paths.py::test_per_channel_widths_of_keys_and_values",),
        "a per-channel value chunk's last 16 tokens keep the scratch's stale values",
    ),
    Mutant(
        "straddling-codes-bytes-swapped",
        "kvq/kernels/_unpack.py",
        (("for b in (low_index[i], high_index[i])]", "for b in (high_index[i], low_index[i])]"),),
        ("tests/test_unpack.py",),
        "codes that straddle bytes (3, 5, 6 bits) pair their two bytes high first",
    ),
    Mutant(
        "one-bit-codes-in-reverse",
        "kvq/kernels/_unpack.py",
        (("shifts = list(range(count))", "shifts = list(range(count))[::-1]"),),
        ("tests/test_unpack.py::test_channels_of_mixed_widths_decode_to_numpy",),
        "1-bit codes are read last lane first",
    ),
    Mutant(
        "queries-not-in-the-keys-order",
        "kvq/kernels/attention.py",
        (("queries[head, r, order[head * dim + d]] * factor", "queries[head, r, d] * factor"),),
        ("tests/test_channel_bits.py::test_attention_matches_reference",),
        "queries meet keys held widest first in the model's channel order",
    ),
    Mutant(
        "rows-packed-at-the-previous-row",
        "kvq/_rows.py",
        (
            (
                "np.cumsum(row_bytes(widths, length), out=offsets[1:])",
                "np.cumsum(row_bytes(widths, length), out=offsets[1:])\n    offsets[1:-1] -= 1",
            ),
        ),
        ("tests/test_channel_bits.py::test_codes_and_params_equal_reference",),
        "each channel's codes start a byte early, over the previous channel's last byte",
    ),
    Mutant(
        "allocation-widens-the-least-useful-run",
        "kvq/allocation.py",
        (
            (
                "heapq.heappush(heap, (-saved / extra, run, extra))",
                "heapq.heappush(heap, (saved / extra, run, extra))",
            ),
        ),
        ("tests/test_channel_bits.py::test_allocation_is_optimal_on_small_cases",),
        "the greedy allocation widens the run that saves the least error per bit first",
    ),
    Mutant(
        "sink-merge-ignores-the-body-weight",
        "kvq/kernels/sink_tokens.py",
        (("row[d] = body * np.float64(out[head, r, d])", "row[d] = np.float64(out[head, r, d])"),),
        ("tests/test_sink_tokens.py",),
        "the merge of exact sink tokens takes the kernel's normalised output as its sum",
    ),
    Mutant(
        "sink-tokens-widen-their-chunk",
        "kvq/kvcache.py",
        (("if count and base < self.sink_tokens:", "if False:"),),
        ("tests/test_sink_tokens.py::test_chunks_do_not_see_the_sink_tokens",),
        "chunks quantize the sink tokens' own values (their range widens the groups)",
    ),
    Mutant(
        "sink-tokens-seen-by-earlier-queries",
        "kvq/kernels/sink_tokens.py",
        (("if (causal and p > position)", "if (causal and p > position + 1)"),),
        ("tests/test_sink_tokens.py",),
        "a query sees the sink token after its own position (the causal mask shifted)",
    ),
)

NOOP = Mutant(
    "noop-control",
    "kvq/kernels/search.py",
    (("_REFINE_STEPS = 2", "_REFINE_STEPS = 2  # mutated"),),
    ("tests/test_search.py",),
    "changes a comment only: must survive (checks that the check can fail)",
)


class PatternError(RuntimeError):
    pass


def mutated(mutant: Mutant, root: Path) -> str:
    """The text of ``mutant``'s file under ``root`` with its edits applied; each snippet must
    occur exactly once (PatternError otherwise) and change the text."""
    path = root / mutant.path
    if not path.is_file():
        raise PatternError(f"mutant {mutant.name}: file {mutant.path} not found")
    text = original = path.read_text()
    for snippet, replacement in mutant.edits:
        count = text.count(snippet)
        if count != 1:
            found = "pattern not found" if count == 0 else f"pattern found {count} times"
            raise PatternError(f"mutant {mutant.name}: {found} in {mutant.path}: {snippet!r}")
        text = text.replace(snippet, replacement)
    if text == original:
        raise PatternError(f"mutant {mutant.name}: its edits change nothing")
    return text


def apply(mutant: Mutant, root: Path) -> None:
    """Apply ``mutant``'s edits to the copy at ``root`` (see :func:`mutated`)."""
    (root / mutant.path).write_text(mutated(mutant, root))


def copy_tree(target: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "results", "*.nbi"
    )
    shutil.copytree(ROOT, target, ignore=ignore, symlinks=True)
    return target


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str, float]:
    """(passed, last lines of output, seconds) of pytest -x -q on ``tests`` in ``root``."""
    with tempfile.TemporaryDirectory(prefix="kvq-numba-") as cache:
        env = dict(os.environ, PYTHONPATH=str(root), NUMBA_CACHE_DIR=cache)
        env.pop("NUMBA_BOUNDSCHECK", None)
        check = (
            "import kvq, pathlib, sys; "
            f"sys.exit(0 if pathlib.Path(kvq.__file__).is_relative_to({str(root)!r}) else 3)"
        )
        if subprocess.run([sys.executable, "-c", check], cwd=root, env=env).returncode:
            raise RuntimeError(f"kvq does not import from the copy at {root}")
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [*command, *tests],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return False, "timed out", time.perf_counter() - start
        seconds = time.perf_counter() - start
    lines = (done.stdout + done.stderr).strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    summary = failed[0] if failed else (lines[-1] if lines else "")
    return done.returncode == 0, summary, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--noop", action="store_true", help="add a no-op control mutant")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.k in m.name]
    if args.noop:
        mutants.append(NOOP)
    if args.list:
        for m in mutants:
            print(f"{m.name:38s} {m.path:28s} {' '.join(m.tests)}\n    {m.what}")
        return 0
    if not mutants:
        print(f"no mutant matches -k {args.k!r}")
        return 2
    total_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvq-mutation-") as scratch:
        scratch = Path(scratch)
        # every pattern is checked before anything runs: a refactor fails fast and loudly
        for m in mutants:
            mutated(m, ROOT)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            base = copy_tree(scratch / "base")
            passed, summary, seconds = run_tests(base, tests, args.timeout)
            outcome = "pass" if passed else "FAIL"
            print(f"{'baseline (unmutated)':38s} {outcome:8s} {seconds:6.1f}s", flush=True)
            if not passed:
                print(f"    {summary}\nthe unmutated tests must pass first")
                return 2
        rows = []
        for m in mutants:
            root = copy_tree(scratch / m.name)
            apply(m, root)
            passed, summary, seconds = run_tests(root, m.tests, args.timeout)
            shutil.rmtree(root)
            status = "survived" if passed else "caught"
            rows.append((m, status, seconds))
            print(f"{m.name:38s} {status:8s} {seconds:6.1f}s  {summary}", flush=True)
    survived = [m.name for m, status, _ in rows if status == "survived"]
    print(
        f"{len(rows) - len(survived)} of {len(rows)} mutants caught in "
        f"{time.perf_counter() - total_start:.0f}s"
    )
    if survived:
        print("survived: " + ", ".join(survived))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
