"""Command line: ``python -m svdkernels bench [--quick] [--only FAMILY ...] [--out DIR] [--repeats N]``,
``python -m svdkernels analyze spectra|intruders|gradients|heads|mnn [--model PATH] ...`` and
``python -m svdkernels gpucheck --out DIR [--dry-run]``."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m svdkernels", description="svdkernels command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite",
        description="Time every op family against its peers, with accuracy; print one table "
        "per family and write DIR/bench.json (and DIR/bench.png when matplotlib is installed).",
    )
    bench.add_argument("--quick", action="store_true", help="small workloads (under a minute in all)")
    bench.add_argument(
        "--only", nargs="+", action="extend", metavar="FAMILY", help="run only these families (e.g. rsvd)"
    )
    bench.add_argument("--out", type=Path, default=Path("bench-results"), metavar="DIR",
                       help="output directory (default: bench-results)")
    bench.add_argument("--repeats", type=int, metavar="N",
                       help="timed repeats per measurement, median reported (default 5, 3 with --quick)")
    bench.add_argument("--device", help="torch device to run on (default: cuda if available, else cpu)")
    from svdkernels.analysis import cli as analyze_cli  # argument definitions only: no transformers, no matplotlib

    analyze_cli.configure(sub.add_parser(
        "analyze",
        help="spectral analysis of a model (JSON + PNG)",
        description="Spectra of every linear weight, intruder dimensions against a fine-tuned model, per-sample "
        "gradient spectra, head composition or the Matrix Nuclear-Norm score; writes DIR/<what>.json and .png.",
    ))
    from svdkernels import gpucheck  # standard library only: --help stays instant

    gpucheck.configure(sub.add_parser(
        "gpucheck",
        help="prove the kernels on a GPU: kernel tests, bench, report (JSON + markdown + PNG)",
        description="Environment, optional C++ build, the kernel tests with the interpreter off, the quick "
        "bench on CUDA and a report in DIR, each stage under a time budget; --dry-run runs it all on the CPU.",
    ))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        # Imported here so that `--help` stays instant.
        import torch

        from svdkernels.bench import load_families, run

        known = sorted(load_families())
        unknown = [name for name in args.only or () if name not in known]
        if unknown:
            parser.error(f"--only: unknown family {', '.join(unknown)} (known: {', '.join(known)})")
        if args.repeats is not None and args.repeats < 1:
            parser.error(f"--repeats: expected a positive integer, got {args.repeats}")
        device = torch.device(args.device) if args.device else None
        run(args.only, quick=args.quick, repeats=args.repeats, out_dir=args.out, device=device)
    elif args.command == "analyze":
        from svdkernels.analysis import cli as analyze_cli

        return analyze_cli.run(args, parser.error)
    elif args.command == "gpucheck":
        from svdkernels import gpucheck

        return gpucheck.run_cli(args, parser.error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
