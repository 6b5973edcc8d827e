"""``ct-zeroshot``: the deploy side's command line.

``findings`` lists the catalogue; ``preprocess`` turns a NIfTI file or a DICOM series folder
into the model input a package's preprocessing spec defines (for checking geometry by hand).
Inference (``infer``) and the PACS listener (``serve``) build on these.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .volume import VolumeError


def _findings(args: argparse.Namespace) -> int:
    from .findings import load_catalogue

    cat = load_catalogue()
    if args.json:
        print(json.dumps([{"id": f.id, "display": f.display, "section": f.section,
                           "code": [f.code.scheme, f.code.value, f.code.meaning],
                           "positive_prompts": f.positive_prompts, "negative_prompts": f.negative_prompts}
                          for f in cat], indent=1))
        return 0
    print(f"{'id':32s} {'section':16s} code")
    for f in cat:
        print(f"{f.id:32s} {f.section:16s} ({f.code.scheme}, {f.code.value}, \"{f.code.meaning}\")")
    return 0


def _spec(value: str):
    from .preprocessing import PreprocessSpec

    if value == "merlin":
        return PreprocessSpec.merlin()
    if value == "tiny":
        return PreprocessSpec.tiny()
    path = Path(value)
    if not path.exists():
        raise VolumeError(f"{path}: preprocessing spec file does not exist (or use 'merlin' / 'tiny')")
    return PreprocessSpec.from_dict(json.loads(path.read_text()))


def _preprocess(args: argparse.Namespace) -> int:
    import numpy as np

    from .dicom_series import load_dicom_folder
    from .preprocessing import preprocess
    from .volume import load_nifti

    spec = _spec(args.spec)
    src = Path(args.input)
    vol = load_dicom_folder(src) if src.is_dir() else load_nifti(src)
    arr = preprocess(vol, spec)
    np.save(args.out, arr)
    print(f"{src}: {vol.array.shape} voxels, spacing {tuple(round(s, 3) for s in vol.spacing)} mm, "
          f"orientation {vol.axcodes} -> {args.out}: {arr.shape} float32 in [{arr.min():.3f}, {arr.max():.3f}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct-zeroshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("findings", help="list the 30 findings with their sections and codes")
    f.add_argument("--json", action="store_true", help="full catalogue with prompts, as JSON")
    f.set_defaults(func=_findings)
    pp = sub.add_parser("preprocess", help="NIfTI file or DICOM series folder -> model input (.npy)")
    pp.add_argument("input")
    pp.add_argument("--out", required=True, help="output .npy file")
    pp.add_argument("--spec", default="merlin", help="'merlin' (default), 'tiny', or a spec JSON file")
    pp.set_defaults(func=_preprocess)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (VolumeError, ValueError, OSError) as exc:
        print(f"ct-zeroshot {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
