"""The synthetic corpus, written in the Merlin release format (and optionally as DICOM).

Layout of ``OUT``::

    merlin_data/<study id>.nii.gz           HU volume, int16, RAS affine
    reports_final.csv (+ .xlsx)             study id, Findings, Split, Few Shot
    zero_shot_findings_disease_cls.csv      study id + 30 finding columns (1 / 0 / -1)
    dicom/<study id>/CT####.dcm             with --dicom: a CT Image Storage series per study
    ground_truth.jsonl                      what each phantom really contains (severity, side, site)
    lesion_masks/<study id>/<finding>.nii.gz  each present finding's voxels (uint8, the volume's grid)
    dicom_seg/<study id>.dcm                with --dicom: the same masks as a DICOM Segmentation of the series
    prevalence.csv, prevalence.md           per finding: prevalence, label counts per split
    montage.png                             axial slices through findings
    corpus.json                             generator settings and version; written last

Every study draws from its own ``numpy`` generator seeded by (seed, index), so the corpus is
deterministic for a seed whatever the number of workers. Tables are written last and through
temporary files: an interrupted run never leaves a corpus that looks complete.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from operators import __version__
from operators.contract.files import atomic_path, write_atomic, write_json
from operators.contract.findings import load_catalogue
from operators.contract.volume import Volume, save_nifti

from .dicom_writer import make_identity, write_ct_series, write_lesion_seg
from .patient import sample_patient, vary_anatomy
from .phantom import build_phantom
from .raster import Grid
from .report import write_report

PROFILES = ("tiny", "full")
SPLIT_FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}
CORPUS_FORMAT = 1


CORPUS_VERSIONS = (1, 2, 3, 4)


@dataclass(frozen=True)
class SynthConfig:
    out: str
    studies: int
    seed: int = 0
    profile: str = "tiny"
    dicom: bool = False
    workers: int = 1
    masks: bool = True  # each present finding's lesion mask: lesion_masks/ (and dicom_seg/ with dicom)
    version: int = 1  # phantom version: 1 as first published; 2 and 3 make the small focal findings conspicuous;
    # 4 varies anatomy, habitus and scanner as patients and scanners do, and paints lesions at the reports' sizes

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        if self.studies < 1:
            raise ValueError("--studies must be at least 1")
        if self.version not in CORPUS_VERSIONS:
            raise ValueError(f"corpus version must be one of {CORPUS_VERSIONS}, got {self.version!r}")


def study_id(seed: int, index: int) -> str:
    """Merlin-like ids ('AC423ccbe'): two letters and seven hex digits, unique per (seed, index)."""
    return "SY" + hashlib.sha1(f"{seed}:{index}".encode()).hexdigest()[:7]


def split_of(seed: int, index: int) -> str:
    u = np.random.default_rng([seed, index, 7]).random()
    acc = 0.0
    for name, frac in SPLIT_FRACTIONS.items():
        acc += frac
        if u < acc:
            return name
    return "test"


def make_grid(profile: str, patient, rng: np.random.Generator, version: int = 1) -> tuple[Grid, float, float]:
    """Sampling grid for a patient: (grid, noise sd in HU, blur sigma in voxels). From corpus version 4 the
    scanner varies per study: quantum noise and the reconstruction kernel's sharpness (blur)."""
    b = patient.body
    length = b["length"] * 1.04
    width = 2 * b["half_width"] + 40
    if profile == "tiny":
        px = float(rng.uniform(4.6, 5.4))
        dz = float(rng.choice([5.0, 6.0]))
        n = int(math.ceil(width / px))
        noise, blur = 6.0, 0.4
    else:
        px = max(float(rng.uniform(0.6, 0.9)), width / 512)
        dz = float(rng.choice([1.25, 2.5, 3.0, 5.0], p=[0.25, 0.35, 0.2, 0.2]))
        n = 512
        noise, blur = 14.0, 0.6
    if version >= 4:  # drawn after the grid: versions 1-3 keep their draws
        noise = float(rng.uniform(3.0, 14.0)) if profile == "tiny" else float(rng.uniform(8.0, 28.0))
        blur = float(rng.uniform(0.2, 0.9))
    nz = int(math.ceil(length / dz))
    z_origin = float(rng.uniform(-450, -150))
    origin = (-(n - 1) * px / 2, -(n - 1) * px / 2 + 12.0, z_origin)
    return Grid((n, n, nz), (px, px, dz), origin), noise, blur


def generate_study(args: tuple) -> dict:
    """Generate and write one study; returns its table rows (runs in a worker process)."""
    cfg, index = args
    out = Path(cfg.out)
    sid = study_id(cfg.seed, index)
    rng = np.random.default_rng([cfg.seed, index])
    patient = sample_patient(rng, index)
    if cfg.version >= 4:
        vary_anatomy(patient)
    # the report first (its own generator, so its text is the same at every version): version 4's phantom
    # paints a lesion at the size its report states
    text, labels = write_report(patient, np.random.default_rng([cfg.seed, index, 1]))
    grid, noise, blur = make_grid(cfg.profile, patient, rng, cfg.version)
    masks: dict[str, np.ndarray] | None = {} if cfg.masks else None
    hu, _ = build_phantom(patient, grid, rng, noise_sd=noise, blur_vox=blur, version=cfg.version, masks=masks)
    nii = out / "merlin_data" / f"{sid}.nii.gz"
    with atomic_path(nii, suffix=".nii.gz") as tmp:  # nibabel compresses by the .gz ending
        save_nifti(Volume(hu, grid.affine_ras()), tmp)
    if masks:
        mdir = out / "lesion_masks" / sid
        with atomic_path(mdir) as tmpdir:
            tmpdir.mkdir(parents=True)
            for fid, mask in masks.items():
                save_nifti(Volume(mask.astype(np.uint8), grid.affine_ras()), tmpdir / f"{fid}.nii.gz")
            shutil.rmtree(mdir, ignore_errors=True)
    if cfg.dicom:
        ddir = out / "dicom" / sid
        ident = make_identity(sid, cfg.seed, patient.age, patient.sex)
        with atomic_path(ddir) as tmpdir:
            paths = write_ct_series(hu, grid, tmpdir, ident, position=patient.position, seed=cfg.seed)
            if masks:  # the SEG beside the series folder, which holds one series
                seg = out / "dicom_seg" / f"{sid}.dcm"
                seg.parent.mkdir(exist_ok=True)
                with atomic_path(seg, suffix=".dcm") as tmp:
                    write_lesion_seg(masks, paths, tmp, patient.position, cfg.seed)
            shutil.rmtree(ddir, ignore_errors=True)  # a folder is renamed only onto nothing
    split = split_of(cfg.seed, index)
    few_shot = int(split == "train" and np.random.default_rng([cfg.seed, index, 9]).random() < 0.1)
    truth = {
        "study id": sid,
        "split": split,
        "age": patient.age,
        "sex": patient.sex,
        "position": patient.position,
        "normal": not patient.findings,
        "conditions": list(patient.conditions),
        "spacing": list(grid.spacing),
        **({"scanner": {"noise_sd_hu": round(noise, 2), "blur_voxels": round(blur, 3)}} if cfg.version >= 4 else {}),
        "shape": list(grid.shape),
        "findings": {
            fid: {"severity": f.severity, "side": f.side, "reported": f.reported, "site_lps_mm": f.site}
            for fid, f in patient.findings.items()
        },
    }
    return {"id": sid, "report": text, "split": split, "few_shot": few_shot, "labels": labels, "truth": truth}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _write_xlsx(path: Path, header: list[str], rows: list[list]) -> bool:
    try:
        from openpyxl import Workbook
    except ImportError:
        return False
    wb = Workbook(write_only=True)
    ws = wb.create_sheet("reports")
    ws.append(header)
    for r in rows:
        ws.append(r)
    with atomic_path(path) as tmp:
        wb.save(tmp)
    return True


def prevalence_table(results: list[dict]) -> list[dict]:
    """Per finding: true prevalence in the images and label counts per split."""
    ids = load_catalogue().ids
    rows = []
    n = len(results)
    for fid in ids:
        row = {"finding": fid, "prevalence": sum(fid in r["truth"]["findings"] for r in results) / n}
        for split in ("all", *SPLIT_FRACTIONS):
            sub = [r for r in results if split == "all" or r["split"] == split]
            for v, name in ((1, "pos"), (0, "neg"), (-1, "unmentioned")):
                row[f"{split}_{name}"] = sum(r["labels"][fid] == v for r in sub)
        rows.append(row)
    return rows


def write_montage(out: Path, results: list[dict], profile: str, max_panels: int = 24) -> Path | None:
    """PNG of axial slices through findings, one panel per finding where an example exists."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from operators.contract.volume import load_nifti

    panels = []
    seen = set()
    normal = next((r for r in results if r["truth"]["normal"]), None)
    if normal is not None:
        panels.append((normal, None))
    for r in results:
        for fid, f in r["truth"]["findings"].items():
            if fid not in seen and f["site_lps_mm"] is not None and len(panels) < max_panels:
                seen.add(fid)
                panels.append((r, fid))
    if not panels:
        return None
    cols = 6
    rows = int(math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows))
    for ax in np.atleast_1d(axes).flat:
        ax.axis("off")
    for ax, (r, fid) in zip(np.atleast_1d(axes).flat, panels):
        vol = load_nifti(out / "merlin_data" / f"{r['id']}.nii.gz")
        inv = np.linalg.inv(vol.affine)
        if fid is None:
            k = vol.array.shape[2] // 2
            title = f"{r['id']} normal"
        else:
            x, y, z = r["truth"]["findings"][fid]["site_lps_mm"]
            k = int(round((inv @ np.array([-x, -y, z, 1.0]))[2]))
            k = min(max(k, 0), vol.array.shape[2] - 1)
            title = f"{fid}\n({r['truth']['findings'][fid]['severity']})"
        # array is [i, j, k] with i -> patient left (RAS affine has -x); show anterior up, patient left right.
        ax.imshow(vol.array[:, :, k].T, cmap="gray", vmin=-250, vmax=350, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"ct-zeroshot synthetic phantoms ({profile} profile): axial slices through findings", fontsize=11)
    fig.tight_layout()
    path = out / "montage.png"
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def generate_corpus(cfg: SynthConfig, progress: bool = True) -> dict:
    """Generate the corpus described by ``cfg``; returns a summary dict."""
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "corpus.json").exists() or (out / "reports_final.csv").exists():
        raise FileExistsError(f"{out}: already holds a corpus; choose an empty folder")
    (out / "merlin_data").mkdir(exist_ok=True)
    if cfg.dicom:
        (out / "dicom").mkdir(exist_ok=True)
    t0 = time.time()
    jobs = [(cfg, i) for i in range(cfg.studies)]
    bar = tqdm(total=cfg.studies, desc=f"synth {cfg.profile}", unit="study", disable=not progress)
    results: list[dict] = []
    if cfg.workers > 1:
        # spawn, not fork: a caller with threads (a listener, a progress monitor) may hold a lock at fork time,
        # and a forked child that needs it waits forever
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            for res in ex.map(generate_study, jobs, chunksize=4):
                results.append(res)
                bar.update()
    else:
        for job in jobs:
            results.append(generate_study(job))
            bar.update()
    bar.close()
    ids = load_catalogue().ids
    report_rows = [[r["id"], r["report"], r["split"], r["few_shot"]] for r in results]
    header = ["study id", "Findings", "Split", "Few Shot"]
    _write_csv(
        out / "zero_shot_findings_disease_cls.csv",
        ["study id", *ids],
        [[r["id"], *[r["labels"][f] for f in ids]] for r in results],
    )
    xlsx = _write_xlsx(out / "reports_final.xlsx", header, report_rows)
    write_atomic(out / "ground_truth.jsonl", "".join(json.dumps(r["truth"]) + "\n" for r in results))
    prev = prevalence_table(results)
    _write_csv(out / "prevalence.csv", list(prev[0]), [list(p.values()) for p in prev])
    md = ["| finding | prevalence | labels 1 / 0 / -1 (all) | train 1 / 0 | test 1 / 0 |", "|---|---|---|---|---|"]
    for p in prev:
        md.append(
            f"| {p['finding']} | {100 * p['prevalence']:.1f}% | {p['all_pos']} / {p['all_neg']} / "
            f"{p['all_unmentioned']} | {p['train_pos']} / {p['train_neg']} | {p['test_pos']} / {p['test_neg']} |"
        )
    normal = sum(r["truth"]["normal"] for r in results) / len(results)
    md.append(
        f"\n{len(results)} studies; {100 * normal:.1f}% entirely normal; "
        f"splits: " + ", ".join(f"{s} {sum(r['split'] == s for r in results)}" for s in SPLIT_FRACTIONS)
    )
    (out / "prevalence.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    montage = write_montage(out, results, cfg.profile)
    # The reports table and corpus.json last: their presence marks a complete corpus.
    _write_csv(out / "reports_final.csv", header, report_rows)
    summary = {
        "format": CORPUS_FORMAT,
        "generator": f"ct-zeroshot {__version__}",
        "corpus_version": cfg.version,
        "config": asdict(cfg),
        "studies": len(results),
        "normal_fraction": normal,
        "seconds": round(time.time() - t0, 1),
        "xlsx": xlsx,
        "montage": str(montage) if montage else None,
    }
    write_json(out / "corpus.json", summary)
    return summary
