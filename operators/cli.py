"""``ct-zeroshot``: the deploy side's command line.

``findings`` lists the catalogue; ``preprocess`` turns a NIfTI file or a DICOM series folder
into the model input a package's preprocessing spec defines (for checking geometry by hand).
Inference (``infer``) and the PACS listener (``serve``) build on these.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .contract.findings import load_catalogue
from .contract.scoring import DEVICES, DeviceError
from .contract.volume import VolumeError


def _findings(args: argparse.Namespace) -> int:
    from .contract.findings import load_catalogue

    if args.action == "check":
        return _check_findings(args)
    if args.file:
        raise ValueError(f"{args.file}: a file is only read by 'findings check'")
    cat = load_catalogue()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": f.id,
                        "display": f.display,
                        "section": f.section,
                        "code": [f.code.scheme, f.code.value, f.code.meaning],
                        "positive_prompts": f.positive_prompts,
                        "negative_prompts": f.negative_prompts,
                    }
                    for f in cat
                ],
                indent=1,
            )
        )
        return 0
    print(f"{'id':32s} {'section':16s} code")
    for f in cat:
        print(f'{f.id:32s} {f.section:16s} ({f.code.scheme}, {f.code.value}, "{f.code.meaning}")')
    return 0


def _check_findings(args: argparse.Namespace) -> int:
    """``findings check FILE``: the file's own checks; with ``--model``, the model's (ids, prompt lengths,
    a text encoder); with ``--studies``, each custom finding's margins over those studies."""
    import numpy as np

    from .contract.custom_findings import read_findings_file

    if not args.file:
        raise ValueError("findings check: name the findings file to check")
    ff = read_findings_file(args.file)
    print(f"{args.file}: {len(ff.findings)} finding(s) read, digest {ff.digest[:16]}")
    for c in ff.findings:
        f = c.finding
        print(
            f"  {f.id:28s} {f.display[:28]:28s} ({f.code.scheme}, {f.code.value}) threshold {c.threshold:g}; "
            f"{len(f.positive_prompts)} positive, {len(f.negative_prompts)} negative prompt(s)"
        )
    if not args.model and not args.studies:
        print("file checks passed (add --model PKG to check it against a model package)")
        return 0
    from .contract.package import default_package_dir, load_package
    from .contract.scoring import ZeroShotModel

    pkg = load_package(args.model or default_package_dir())
    model = ZeroShotModel(pkg, device="cpu", findings=args.file, findings_mode=args.findings_mode)
    print(f"model {pkg.name} {pkg.version}: ids, prompt lengths and the text encoder accepted ({args.findings_mode})")
    if not args.studies:
        return 0
    from .contract.dicom_series import scan_tree
    from .pipeline import SeriesToModelInput, StudyWork, select_series

    prep = SeriesToModelInput(model.package.spec)
    ids = model.package.catalogue.ids
    cols = [ids.index(i) for i in ff.ids]
    others = [j for j, i in enumerate(ids) if i not in ff.ids]
    margins, probs, every = [], [], []
    for uid, series in sorted(scan_tree(args.studies).studies().items()):
        work = prep(select_series(StudyWork(uid, series)))
        if work.failed or work.tensor is None:
            print(f"  study {uid}: skipped ({work.reason})")
            continue
        found = model.decide(model.embed_images(work.tensor[None]))[0]
        margins.append(found.margins[cols])
        probs.append(found.present[cols])
        every.append(found.margins[others])
    if not margins:
        raise ValueError(f"{args.studies}: no study could be scored")
    m, present = np.asarray(margins), np.asarray(probs)
    print(f"margins (s+ - s-) over {len(m)} studies: min / 25% / median / 75% / max; studies called present")
    for j, fid in enumerate(ff.ids):
        q = np.percentile(m[:, j], [0, 25, 50, 75, 100])
        print(f"  {fid:28s} " + " / ".join(f"{v:+.4f}" for v in q) + f"; {int(present[:, j].sum())} of {len(m)}")
    if len(m) >= 3 and others:
        # A wording that only re-scores another finding (or "anything abnormal") follows it study by study.
        o = np.asarray(every)
        print("the model's finding each custom finding's margins follow most closely (Pearson r over these studies)")
        for j, fid in enumerate(ff.ids):
            r = [
                np.corrcoef(m[:, j], o[:, k])[0, 1] if o[:, k].std() > 0 and m[:, j].std() > 0 else 0.0
                for k in range(o.shape[1])
            ]
            k = int(np.nanargmax(np.abs(r)))
            print(f"  {fid:28s} {ids[others[k]]} (r = {r[k]:+.2f})")
    return 0


def _spec(value: str):
    from .contract.preprocessing import PreprocessSpec

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

    from .contract.dicom_series import load_dicom_folder
    from .contract.preprocessing import preprocess
    from .contract.volume import load_nifti

    spec = _spec(args.spec)
    src = Path(args.input)
    vol = load_dicom_folder(src) if src.is_dir() else load_nifti(src)
    arr = preprocess(vol, spec)
    np.save(args.out, arr)
    print(
        f"{src}: {vol.array.shape} voxels, spacing {tuple(round(s, 3) for s in vol.spacing)} mm, "
        f"orientation {vol.axcodes} -> {args.out}: {arr.shape} float32 in [{arr.min():.3f}, {arr.max():.3f}]"
    )
    return 0


def _labels(path: str | None) -> dict[str, dict[str, int]]:
    """Merlin-format labels (``zero_shot_findings_disease_cls.csv``: study id, one 1/0/-1 column per finding)."""
    if not path:
        return {}
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    ids = load_catalogue().ids
    key = next(iter(rows[0])) if rows else "study id"
    return {r[key]: {fid: int(float(r[fid])) for fid in ids if r.get(fid) not in (None, "")} for r in rows}


def _truth(path: str | None) -> dict[str, dict[str, int]]:
    """The synthetic corpus's ``ground_truth.jsonl``: per study, 1 for every finding its phantom holds and 0
    for every other catalogue finding (the truth has no "not mentioned")."""
    if not path:
        return {}
    from .contract.files import jsonl_records

    ids = load_catalogue().ids
    out = {}
    for _, rec in jsonl_records(path, ("study id", "findings")):
        held = set(rec["findings"])
        out[str(rec["study id"])] = {fid: int(fid in held) for fid in ids}
    return out


SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _report(args: argparse.Namespace) -> int:
    import pydicom

    from .sr import read_findings

    files = sorted(Path(args.sr).glob("*.dcm")) if Path(args.sr).is_dir() else [Path(args.sr)]
    if not files:
        raise ValueError(f"{args.sr}: no SR files")
    if args.labels and args.truth:
        raise ValueError("report: give --labels or --truth, not both")
    labels = _truth(args.truth) if args.truth else _labels(args.labels)
    what = "truly present" if args.truth else "labelled present"
    names = {f.id: f.display for f in load_catalogue()}
    called = truly = not_assessed = 0
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if Path(args.sr).is_dir() and str(ds.get("SOPClassUID", "")) == SEGMENTATION_STORAGE:
            continue  # a study's map SEG beside its SR
        study = str(ds.get("AccessionNumber", "") or ds.StudyInstanceUID)
        truth = labels.get(study, {})
        print(f"\n{path.name}\n  study {ds.StudyInstanceUID} (accession {study})")
        print(f"  {'finding':32s} {'prob.':>6s}  {'decision':8s} {'truth' if labels else ''}")
        for fid, v in read_findings(path).items():
            called += int(v["present"])
            truly += int(truth.get(fid) == 1)
            not_assessed += int(not v["assessed"])
            if args.present_only and not v["present"] and truth.get(fid) != 1:
                continue
            t = {1: "present", 0: "absent", -1: "-"}.get(truth.get(fid, 2), "") if labels else ""
            mark = "" if not t or t == "-" or not v["assessed"] or (t == "present") == v["present"] else "  x"
            decision = "n/a" if not v["assessed"] else ("PRESENT" if v["present"] else "absent")
            print(f"  {names.get(fid, fid):32s} {v['certainty'] / 100:6.3f}  {decision:8s} {t}{mark}")
    print(f"\n{len(files)} SR(s): {called} findings called present", end="")
    if labels:
        ratio = f"{called / truly:.2f}x" if truly else "-"
        print(f"; {truly} {what} ({ratio})", end="")
    print(f"; {not_assessed} finding results not assessed (n/a: the model package cannot assess them)")
    return 0


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _infer(args: argparse.Namespace) -> int:
    import logging

    from .batch import run_batch
    from .contract.phi import allow_identifiers, identifiers_allowed
    from .sr import use_site_codes

    allow_identifiers(args.log_patient_identifiers or identifiers_allowed())
    use_site_codes(args.uid_root, args.procedure, ("--uid-root", "--procedure"))

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("ct-zeroshot").setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    from tqdm.contrib.logging import logging_redirect_tqdm

    # SIGTERM (a scheduler, docker stop) ends the batch as Ctrl-C does: its workers are stopped with it
    # (batch._local_rows), none is left holding a model in memory; the summary is not written.
    stow = None
    if args.stow:
        from .dicomweb import StowTarget

        stow = StowTarget(args.stow, args.stow_auth, args.stow_credentials, args.stow_ca)
    source = None
    if args.input.startswith(("http://", "https://")):
        from .dicomweb import Source, StudyQuery

        query = StudyQuery(args.modality, args.dates, tuple(args.study or ()))
        source = (Source(args.input, args.source_auth, args.source_credentials, args.source_ca), query)
    elif args.study or args.dates:
        raise ValueError("--study and --dates select studies at a DICOMweb source: give its URL as the input")
    signal.signal(signal.SIGTERM, _terminated)
    with logging_redirect_tqdm(loggers=[logging.getLogger("ct-zeroshot")]):  # log lines do not cut the bar
        code, rows = run_batch(
            args.input,
            args.out,
            args.model,
            workers=args.workers,
            force=args.force,
            progress=not args.quiet,
            findings=args.findings,
            findings_mode=args.findings_mode,
            engine=args.engine,
            address=args.address,
            gpus_per_worker=args.gpus_per_worker,
            maps=args.maps,
            device=args.device,
            stow=stow,
            source=source,
        )
    failed = [r for r in rows if r["status"] != "ok"]
    print(
        f"{len(rows) - len(failed)} of {len(rows)} studies ok; SRs in {Path(args.out) / 'sr'}; "
        f"summary {Path(args.out) / 'summary.csv'}"
    )
    for r in failed:
        print(f"FAILED {r['study_uid']}: {r['error']}")
    for r in rows:
        if str(r.get("stored", "")).startswith("failed"):
            print(f"NOT STORED {r['study_uid']}: {r['stored'][len('failed: ') :]} (stored by the next run)")
    return code


def _serve(args: argparse.Namespace) -> int:
    import logging

    from .listener import check, serve

    if args.check is None and args.config is None:
        raise ValueError("name the listener config: --config FILE (or --check FILE to check it without serving)")
    level = logging.WARNING if args.check else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("highdicom", "pynetdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return check(args.check) if args.check else serve(args.config)


def _move(args: argparse.Namespace) -> int:
    import logging

    from .listener.move import MoveError, move

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return move(args.config, args.study or [], args.dates, args.modality)
    except MoveError as exc:
        print(f"ct-zeroshot move: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .app import add_findings_arguments, add_maps_argument

    p = argparse.ArgumentParser(
        prog="ct-zeroshot",
        description=(__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser(
        "findings",
        help="list the 30 findings with their sections and codes; 'findings check FILE' checks a site's findings file",
    )
    f.add_argument("action", nargs="?", choices=["list", "check"], default="list")
    f.add_argument("file", nargs="?", help="check: the findings file (YAML)")
    f.add_argument("--json", action="store_true", help="full catalogue with prompts, as JSON")
    f.add_argument("--model", help="check: the model package to check the file against (ids, prompt lengths)")
    f.add_argument("--studies", help="check: a DICOM folder tree; print each custom finding's margins over it")
    f.add_argument("--findings-mode", default="add", choices=["add", "replace"], help="check: as the run will use it")
    f.set_defaults(func=_findings)
    pp = sub.add_parser("preprocess", help="NIfTI file or DICOM series folder -> model input (.npy)")
    pp.add_argument("input")
    pp.add_argument("--out", required=True, help="output .npy file")
    pp.add_argument("--spec", default="merlin", help="'merlin' (default), 'tiny', or a spec JSON file")
    pp.set_defaults(func=_preprocess)
    r = sub.add_parser("report", help="table of the findings in SR files (probability, decision, ground truth)")
    r.add_argument("sr", help="an SR file or a folder of them")
    r.add_argument("--labels", help="Merlin-format label CSV (study id = the SR's accession number) to compare")
    r.add_argument(
        "--truth", help="the synthetic corpus's ground_truth.jsonl: compare with what each phantom really holds"
    )
    r.add_argument("--present-only", action="store_true", help="only findings called present or labelled present")
    r.set_defaults(func=_report)
    i = sub.add_parser("infer", help="batch inference over a DICOM folder tree: SRs, summary.csv/json, resumable")
    i.add_argument(
        "input",
        help="folder tree of DICOM files (any layout; grouped by Study/Series UID), or a DICOMweb base URL: the "
        "studies a QIDO-RS query selects (--modality, --dates, --study) are retrieved by WADO-RS into OUT/retrieved/",
    )
    i.add_argument("--out", required=True, help="output folder: sr/, summary.csv, summary.json")
    i.add_argument("--model", default=None, help="model package (default: the embedded demo model)")
    i.add_argument("--workers", type=int, default=1, help="studies processed in parallel (default 1)")
    i.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="the image encoder's: auto (CUDA when its provider loads, else the CPU), cpu, cuda, or openvino "
        "(OpenVINO's CPU runtime: an int8 package's fast path, docs/cpu.md)",
    )
    i.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: a process pool on this machine (default); ray: actors on a Ray cluster (pip install "
        "'ct-zeroshot[ray]'; archive and --out on storage every node sees)",
    )
    i.add_argument(
        "--address",
        default=None,
        help="with --engine ray: the cluster (auto: the one `ray start` runs here; HOST:PORT); default: a "
        "local cluster with this machine's cores",
    )
    i.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="with --engine ray: GPUs each worker holds (default 0)"
    )
    i.add_argument("--force", action="store_true", help="redo studies that already have an SR")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.add_argument("--verbose", action="store_true", help="log every stage of every study")
    i.add_argument(
        "--log-patient-identifiers",
        action="store_true",
        help="let third-party exception texts, which may quote header values (PHI), into logs and reasons",
    )
    add_findings_arguments(i)
    add_maps_argument(i)
    i.add_argument("--stow", metavar="URL", help="store each study's SEG and SR with STOW-RS at this DICOMweb base URL")
    i.add_argument("--stow-auth", default="none", choices=["none", "basic", "bearer"], help="STOW-RS authentication")
    i.add_argument(
        "--stow-credentials",
        metavar="FILE|env:VAR",
        help="basic: user:password, bearer: the token; the first line of FILE or the environment variable VAR",
    )
    i.add_argument("--stow-ca", metavar="PEM", help="the CA bundle that verifies the endpoint's certificate (https)")
    i.add_argument("--modality", default="CT", help="DICOMweb input: studies holding this modality, its series pulled")
    i.add_argument("--dates", metavar="YYYYMMDD-YYYYMMDD", help="DICOMweb input: study dates (either end may be open)")
    i.add_argument("--study", action="append", metavar="UID", help="DICOMweb input: only this study (repeatable)")
    i.add_argument("--source-auth", default="none", choices=["none", "basic", "bearer"], help="DICOMweb input auth")
    i.add_argument("--source-credentials", metavar="FILE|env:VAR", help="DICOMweb input credentials, as --stow's")
    i.add_argument("--source-ca", metavar="PEM", help="the CA bundle that verifies the DICOMweb input's certificate")
    i.add_argument(
        "--uid-root",
        metavar="UID",
        help="your organisation's UID root for the SR and SEG UIDs (default: pydicom's public root; "
        "$CTZS_UID_ROOT does the same)",
    )
    i.add_argument(
        "--procedure",
        metavar="SCHEME^VALUE^MEANING",
        help='"Procedure reported" for a study without its own Procedure Code Sequence, e.g. '
        '"LN^36813-4^CT Abdomen and Pelvis" (default LOINC 25045-6 CT unspecified body region; $CTZS_PROCEDURE)',
    )
    i.set_defaults(func=_infer)
    sv = sub.add_parser(
        "serve", help="DICOM listener: receive CT studies, send SRs to a PACS (see operators/listener.py)"
    )
    sv.add_argument("--config", help="listener YAML (ae_title, port, allowed, destination, spool, ...)")
    sv.add_argument(
        "--check",
        metavar="CONFIG",
        help="check a listener config without serving: its keys, the model, the spool, the ports and a C-ECHO "
        "(or HTTP request) to the destination; exit 0 when all pass, 1 when one fails, 2 for a bad config",
    )
    sv.set_defaults(func=_serve)
    mv = sub.add_parser(
        "move",
        help="ask the listener's source PACS to send it studies (C-FIND, C-MOVE), for sites that do not route",
    )
    mv.add_argument("--config", required=True, help="the listener's YAML, with a 'source' PACS")
    mv.add_argument("--study", action="append", metavar="UID", help="a study to move (repeatable)")
    mv.add_argument("--dates", metavar="YYYYMMDD-YYYYMMDD", help="find the studies of these dates (C-FIND)")
    mv.add_argument("--modality", default="CT", help="with --dates: studies holding this modality (default CT)")
    mv.set_defaults(func=_move)
    return p


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, errors: tuple[type[Exception], ...]) -> int:
    """Both command lines' entry: run the chosen sub-command; an expected error (``errors``) is one line
    on stderr naming the command, and exit status 2, instead of a traceback."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except errors as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, (VolumeError, ValueError, OSError, DeviceError))


if __name__ == "__main__":
    sys.exit(main())
