"""Command line: ``kvq demo`` and ``kvq plan`` (also ``python -m kvq ...``)."""

import argparse
import sys


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
    demo.add_argument("--block-size", type=int, default=32, help="block size (default 32)")
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
    return parser


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
        f"{'bf16' if bits == 16 else f'{config.bits_per_element:.2f}-bit':>12}"
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
        print(f"{context:>9,} " + " ".join(f"{_size(c):>12}" for c in cells))
    return 0


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvq`` script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "plan":
        return _plan_command(args)
    if args.command == "demo":
        from kvq.demo import run_demo

        for name in ("heads", "tokens", "head_dim", "block_size", "repeats"):
            if getattr(args, name) < 1:
                print(f"kvq demo: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
                return 2
        print(
            run_demo(
                args.heads,
                args.tokens,
                args.head_dim,
                args.block_size,
                args.scale_dtype,
                args.repeats,
            )
        )
    return 0
