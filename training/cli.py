"""``ct-zeroshot-train``: the training side's command line."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _synth(args: argparse.Namespace) -> int:
    from .synth.corpus import SynthConfig, generate_corpus

    cfg = SynthConfig(out=args.out, studies=args.studies, seed=args.seed, profile=args.profile,
                      dicom=args.dicom, workers=args.workers)
    summary = generate_corpus(cfg, progress=not args.quiet)
    print(json.dumps(summary, indent=1))
    print(f"per-finding prevalence: {args.out}/prevalence.md; montage: {summary['montage']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct-zeroshot-train", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="generate the synthetic abdominal CT corpus (Merlin release format)")
    s.add_argument("out", help="output folder (new or empty)")
    s.add_argument("--studies", type=int, default=200, help="number of studies (default 200)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--profile", choices=["tiny", "full"], default="tiny",
                   help="tiny: ~5 mm voxels for CPU training; full: 512x512 clinical geometry")
    s.add_argument("--dicom", action="store_true", help="also write a CT Image Storage series per study")
    s.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="worker processes (default: all cores; the output does not depend on it)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"ct-zeroshot-train {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
