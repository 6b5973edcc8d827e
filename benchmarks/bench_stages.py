"""Benchmark: the application's stage timings on a full-profile CT study.

``python -m benchmarks.bench_stages --out results/bench``: one synthetic study with
clinical geometry (512x512, ~300 slices at 1.25 mm unless ``--slices``) written as a DICOM series,
then the pipeline's stages (series selection, DICOM read, decode + geometry, preprocessing, image
encoder, decision, SR) timed with

- the embedded demo model (or ``--model PKG``), and
- a Merlin-size encoder: Merlin's I3D ResNet-152 with random weights exported to ONNX, Merlin's
  preprocessing (224x224x160 at 1.5x1.5x3 mm), random unit prompt embeddings of Merlin's width
  (timing does not depend on the values).

Each configuration runs ``--runs`` times in one process after a warm-up; medians are reported with the
share of everything-but-the-encoder relative to the encoder. Writes ``stage_timings.json`` and
``stage_timings.md`` in ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

from benchmarks import bench_parser
from operators.contract.dicom_series import scan_tree
from operators.contract.manifest import TextEncoderRecord
from operators.contract.package import default_package_dir, load_package, write_manifest
from operators.contract.preprocessing import PreprocessSpec
from operators.contract.scoring import ZeroShotModel
from operators.pipeline import SeriesToModelInput, StudyWork, infer, select_series, write_report
from training.onnx_export import export_image_onnx

STAGES = ("select_s", "decode_volume_s", "preprocess_s", "encoder_s", "decide_s", "sr_s")
MAP_STAGES = ("maps_s", "seg_s")  # with --maps K: the present findings' maps and their DICOM SEG


def full_profile_study(root: Path, slices: int, seed: int = 5) -> Path:
    """One full-profile phantom written as DICOM (slice thickness chosen so the series has ~``slices``)."""
    from training.synth.corpus import make_grid
    from training.synth.dicom_writer import make_identity, write_ct_series
    from training.synth.patient import sample_patient
    from training.synth.phantom import build_phantom
    from training.synth.raster import Grid

    rng = np.random.default_rng([seed, 0])
    patient = sample_patient(rng, 0)
    grid, noise, blur = make_grid("full", patient, rng)
    dz = patient.body["length"] * 1.04 / slices
    grid = Grid((grid.shape[0], grid.shape[1], slices), (grid.spacing[0], grid.spacing[1], dz), grid.origin)
    hu, _ = build_phantom(patient, grid, rng, noise_sd=noise, blur_vox=blur)
    write_ct_series(
        hu, grid, root / "study", make_identity("BENCHFULL", seed, patient.age, patient.sex), position=patient.position
    )
    return root / "study"


class _TowerWithMaps(torch.nn.Module):
    """Merlin's random-weight image tower as ``onnx_export.localisation_features`` reads a dual encoder."""

    def __init__(self, encoder):
        super().__init__()
        self.encode_image, self.image_norm = encoder, torch.nn.Identity()


def merlin_size_package(demo: Path, out: Path, maps: bool = False) -> Path:
    """The demo package with Merlin's random-weight image encoder, preprocessing and embedding width; with
    ``maps`` the encoder also gives the localisation output."""
    from benchmarks.bench_onnx import image_tower
    from training.onnx_export import LOCALISATION_OUTPUT, _ImageTower

    out.mkdir(parents=True)
    spec = PreprocessSpec.merlin()
    model = image_tower("i3_resnet152")
    if maps:
        model = _ImageTower(_TowerWithMaps(model.enc), localisation=True).eval()
    export_image_onnx(model, out / "image_encoder.onnx", torch.rand(1, 1, *spec.spatial_size), localisation=maps)
    manifest = load_package(demo).manifest
    n = manifest.prompt_embeddings.shape[0]
    emb = np.random.default_rng(0).normal(size=(n, 512)).astype(np.float32)
    np.save(out / "prompt_embeddings.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    manifest = dataclasses.replace(
        manifest,
        preprocessing=spec,
        embedding_dim=512,
        text_encoder=TextEncoderRecord(None, "benchmark package: random prompt embeddings"),
        model=dataclasses.replace(manifest.model, name="merlin-size-random", version="bench"),
        prompt_embeddings=dataclasses.replace(manifest.prompt_embeddings, shape=(n, 512)),
        image_encoder=dataclasses.replace(manifest.image_encoder, localisation=LOCALISATION_OUTPUT if maps else None),
        files={},
    )
    write_manifest(out, manifest)
    return out


def time_stages(study_dir: Path, package: Path, runs: int, sr_dir: Path, present: int = 0) -> dict:
    """``present`` K > 0: maps on, and the first K findings called present in every study (the maps' and
    the SEG's cost grows with the number of present findings, which a random-weight model sets at random)."""
    pkg = load_package(package)
    model = ZeroShotModel(pkg, device="auto", maps=present > 0)
    prep = SeriesToModelInput(pkg.spec)
    stages = STAGES + (MAP_STAGES if present else ())
    per_run = []
    for i in range(runs + 1):  # the first is the warm-up
        t = time.perf_counter()
        ((uid, series),) = scan_tree(study_dir).studies().items()
        scan_s = time.perf_counter() - t
        work = infer(prep(select_series(StudyWork(uid, series))), model)
        if present and work.findings is not None:
            called = np.arange(len(work.findings.ids)) < present
            work.findings = dataclasses.replace(work.findings, present=called & work.findings.assessed)
        work = write_report(work, model, sr_dir)
        if work.failed:
            raise RuntimeError(work.reason)
        row = {"scan_headers_s": scan_s, **{k: work.timings[k] for k in stages}}
        if i:
            per_run.append(row)
        else:
            first = row  # the first study of a fresh process: memory not yet faulted in, sessions cold
    med = {k: statistics.median(r[k] for r in per_run) for k in per_run[0]}
    seg_frames = None
    if present:  # the SEG's size: one frame per present finding and slice its region touches
        (seg,) = sr_dir.glob("SEG_*.dcm")
        seg_frames = int(pydicom.dcmread(seg, stop_before_pixels=True).NumberOfFrames)
    other = sum(v for k, v in med.items() if k != "encoder_s")
    first_other = sum(v for k, v in first.items() if k != "encoder_s")
    return {
        "package": pkg.name,
        "spec": pkg.spec.to_dict(),
        "providers": model.providers,
        "median_s": med,
        "runs": per_run,
        "non_encoder_s": other,
        "non_encoder_over_encoder": other / med["encoder_s"],
        "seg_frames": seg_frames,
        "first_study": first,
        "first_study_non_encoder_s": first_other,
        "first_study_non_encoder_over_encoder": first_other / first["encoder_s"],
    }


def main(argv=None) -> int:
    p = bench_parser("bench_stages", __doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--model", default=None, help="model package (default: the embedded demo model)")
    p.add_argument("--skip-merlin", action="store_true", help="time only the given/demo model")
    p.add_argument(
        "--maps",
        type=int,
        default=0,
        metavar="K",
        help="also time the Merlin-size encoder with localisation maps, K findings called present per study",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Path(args.model) if args.model else default_package_dir()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"writing a full-profile study ({args.slices} slices of 512x512) ...", flush=True)
        study = full_profile_study(tmp, args.slices)
        configs = {"demo model": demo}
        if not args.skip_merlin:
            print("exporting a Merlin-size random-weight image encoder ...", flush=True)
            configs["Merlin-size encoder"] = merlin_size_package(demo, tmp / "merlin-size")
            if args.maps:
                configs[f"Merlin-size encoder, maps of {args.maps} present findings"] = merlin_size_package(
                    demo, tmp / "merlin-size-maps", maps=True
                )
        results = {}
        for name, pkg in configs.items():
            print(f"timing: {name} ({args.runs} runs after a warm-up) ...", flush=True)
            present = args.maps if "maps" in name else 0
            results[name] = time_stages(study, pkg, args.runs, tmp / name.replace(" ", "-").replace(",", ""), present)
    cmd = (
        f"python -m benchmarks.bench_stages --out {args.out} --runs {args.runs} --slices {args.slices}"
        + (f" --model {args.model}" if args.model else "")
        + (" --skip-merlin" if args.skip_merlin else "")
        + (f" --maps {args.maps}" if args.maps else "")
    )
    doc = {
        "command": cmd,
        "study": f"512x512x{args.slices} CT Image Storage series (synthetic phantom)",
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "results": results,
    }
    (out / "stage_timings.json").write_text(json.dumps(doc, indent=1))
    keys = ["scan_headers_s", *STAGES, *(MAP_STAGES if args.maps else ())]
    lines = [
        f"# Stage timings, one {doc['study']}",
        "",
        f"`{cmd}` on {os.cpu_count()} CPU cores; medians of {args.runs} runs after a warm-up, seconds.",
        "",
        "| stage | " + " | ".join(results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for k in keys:
        lines.append(
            f"| {k[:-2]} | "
            + " | ".join(f"{r['median_s'][k]:.3f}" if k in r["median_s"] else "-" for r in results.values())
            + " |"
        )
    lines.append(
        "| **all but the encoder** | " + " | ".join(f"**{r['non_encoder_s']:.2f}**" for r in results.values()) + " |"
    )
    lines.append(
        "| all but the encoder / encoder | "
        + " | ".join(f"{100 * r['non_encoder_over_encoder']:.0f} %" for r in results.values())
        + " |"
    )
    if args.maps:
        lines.append(
            "| SR + SEG / encoder | "
            + " | ".join(
                f"{100 * (r['median_s']['sr_s'] + r['median_s']['seg_s']) / r['median_s']['encoder_s']:.1f} %"
                if "seg_s" in r["median_s"]
                else "-"
                for r in results.values()
            )
            + " |"
        )
        lines.append(
            "| SEG frames | "
            + " | ".join("-" if r["seg_frames"] is None else str(r["seg_frames"]) for r in results.values())
            + " |"
        )
    lines.append(
        "| first study of the process (the warm-up): all but the encoder / encoder | "
        + " | ".join(
            f"{r['first_study_non_encoder_s']:.2f} s / {r['first_study']['encoder_s']:.2f} s = "
            f"{100 * r['first_study_non_encoder_over_encoder']:.0f} %"
            for r in results.values()
        )
        + " |"
    )
    (out / "stage_timings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
