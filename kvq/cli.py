"""Command line: ``kvq demo`` (also ``python -m kvq demo``)."""

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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvq`` script; returns the exit status."""
    args = _build_parser().parse_args(argv)
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
