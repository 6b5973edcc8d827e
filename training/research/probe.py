"""``ct-zeroshot-train probe``: how much of what could be seen in the images does zero-shot use?

Beside a run's zero-shot AUROC per finding (Merlin's rule on its prompts), on the same split:

- **linear probe**: a logistic regression per finding on the run's frozen image embeddings, fitted on
  the training split's report labels (1 / 0; -1 dropped per finding): what the image embedding space
  separates, whatever the text tower and the prompts make of it;
- **supervised reference** (``--supervised-steps N``): a fresh image tower of the run's architecture
  and input trained with binary cross-entropy on the same labels (-1 masked) for N steps of the run's
  batch size: what the architecture learns from the labels themselves at that budget, an upper
  reference for a contrastive run of N steps.

- **report read-out**: the same rule with each test study's own findings text (as the run trains on
  it, ``text.keep_sentences``), through the run's text tower,
  in place of its image embedding: what zero-shot could reach if the image tower reproduced the
  report's embedding exactly. When it is low, the text side (its tower, head and the prompts) caps
  zero-shot, not the images.

Labels are the corpus's report labels, so this runs on the Merlin release as on the synthetic corpus.
Results go to ``RUN/probe.json`` (or ``probe_<checkpoint>.json``) and are printed as a table.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from operators.contract.files import write_json
from operators.contract.findings import load_catalogue

from ..cache import CachedVolumes, build_cache, volume_cache
from ..data import load_studies
from ..evaluate import embed_images, finding_auroc, prompt_embeddings, zero_shot_metrics, zero_shot_scores
from ..models.factory import trunk_features
from ..models.image import ImageEncoder
from ..run_folder import load_run


def per_finding_auroc(scores: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """AUROC of each column of ``scores`` against ``labels`` (1 / 0 / -1; -1 dropped per column)."""
    out = []
    for j in range(labels.shape[1]):
        keep = labels[:, j] != -1
        s = scores[keep, j]
        out.append(None if np.isnan(s).any() else finding_auroc(labels[keep, j], s))
    return out


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float = 1.0) -> np.ndarray:
    """(N_test, n_findings) decision values of one logistic regression per finding, each fitted on the
    training rows whose label is not -1; NaN columns where the training labels have a single class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    tr, te = scaler.transform(train_x), scaler.transform(test_x)
    out = np.full((test_x.shape[0], train_y.shape[1]), np.nan)
    for j in range(train_y.shape[1]):
        keep = train_y[:, j] != -1
        y = train_y[keep, j]
        if y.size == 0 or y.min() == y.max():
            continue
        clf = LogisticRegression(C=c, max_iter=2000).fit(tr[keep], y)
        out[:, j] = clf.decision_function(te)
    return out


UNLABELLED = ("mask", "negative")  # how the supervised reference treats -1 (not mentioned) labels


def train_supervised(
    arch: str,
    volumes,
    labels: np.ndarray,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int = 0,
    progress: bool = True,
    frozen_stages: int = 0,
    pool: str = "avg",
    input_size: tuple[int, int, int] | None = None,
    stem_pool: str = "max",
    val_volumes=None,
    val_labels: np.ndarray | None = None,
    eval_every: int = 0,
    unlabelled: str = "mask",
    device="cpu",
) -> tuple[ImageEncoder, dict]:
    """A fresh ``arch`` image tower with one output per finding, trained with masked BCE on ``labels``
    (-1 ignored) for ``steps`` steps of ``batch_size`` studies drawn without replacement per step.

    ``frozen_stages``, ``pool``, ``input_size``, ``stem_pool``: as the contrastive run's tower (``image.*``): frozen
    stages stay at their initial weights and their output is computed once per volume, as ``train``
    does, so the reference costs what the run's steps cost.

    ``val_volumes`` / ``val_labels`` with ``eval_every``: the tower is scored on them (macro AUROC) every
    ``eval_every`` steps and at the end, and the best state is returned, as the contrastive run keeps its
    best validation checkpoint. ``unlabelled``: ``mask`` ignores -1 labels (the finding is not mentioned);
    ``negative`` trains on them as 0 (most unmentioned findings are absent). Returns (tower, selection)."""
    import copy

    from tqdm import tqdm

    if steps < 1:
        raise ValueError(f"supervised steps must be >= 1, got {steps}")
    if unlabelled not in UNLABELLED:
        raise ValueError(f"unlabelled must be one of {UNLABELLED}, got {unlabelled!r}")
    torch.manual_seed(seed)
    model = ImageEncoder(
        arch, labels.shape[1], frozen_stages=frozen_stages, pool=pool, input_size=input_size, stem_pool=stem_pool
    )
    model = model.to(device)
    trunk = trunk_features(model, volumes, device, batch_size, False, torch.float32) if frozen_stages else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=min(0.1, 50 / steps))
    rng = np.random.default_rng(seed)
    y_all = torch.from_numpy(labels.astype(np.float32))
    model.train()
    bar = tqdm(range(steps), desc="supervised reference", unit="step", disable=not progress)
    step, best, best_state = 0, {"step": None, "macro_auroc": None}, None
    for _ in bar:
        idx = rng.choice(len(volumes), size=min(batch_size, len(volumes)), replace=False)
        if trunk is not None:
            logits = model(trunk[torch.from_numpy(idx)].to(device), from_trunk=True)
        else:
            logits = model(torch.from_numpy(np.stack([volumes[int(i)] for i in idx])).to(device))
        y = y_all[idx].to(device)
        mask = (y != -1).float() if unlabelled == "mask" else torch.ones_like(y)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y.clamp(min=0), weight=mask, reduction="sum"
        ) / mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        step += 1
        if val_volumes is not None and eval_every and (step % eval_every == 0 or step == steps):
            model.eval()
            score = _nanmean(per_finding_auroc(_predict(model, val_volumes, batch_size), val_labels))
            model.train()
            if best["step"] is None or score > best["macro_auroc"]:
                best = {"step": step, "macro_auroc": score}
                best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best = {"step": steps, "macro_auroc": None}
    return model.eval(), best


@torch.no_grad()
def _predict(model: ImageEncoder, volumes, batch_size: int) -> np.ndarray:
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(volumes), batch_size):
        x = torch.from_numpy(np.stack([volumes[j] for j in range(i, min(i + batch_size, len(volumes)))]))
        out.append(model(x.to(device)).cpu())
    return torch.cat(out).numpy()


def probe_run(
    run: str | Path,
    data: str | Path,
    checkpoint: str = "best",
    split: str = "test",
    train_limit: int | None = None,
    supervised_steps: int = 0,
    cache_dir=None,
    seed: int = 0,
    progress: bool = True,
    supervised_seeds: int = 1,
    supervised_unlabelled_variant: bool = False,
    device: str = "auto",
) -> tuple[Path, str]:
    """The probe of ``run`` on ``split`` of ``data``; with ``supervised_steps``, the supervised reference
    over ``supervised_seeds`` seeds (the column is their mean per finding), each with its checkpoint chosen
    on validation, and with ``supervised_unlabelled_variant`` the same with -1 labels trained as 0."""
    if supervised_seeds < 1:
        raise ValueError(f"--supervised-seeds must be >= 1, got {supervised_seeds}")
    from ..devices import torch_device

    run = Path(run)
    device = torch_device(device)
    model, cfg = load_run(run, checkpoint, device)
    studies = load_studies(data)
    train_set = [s for s in studies if s.split == "train" and s.labels is not None]
    test_set = [s for s in studies if s.split == split and s.labels is not None]
    if not train_set:
        raise ValueError(f"{data}: no labelled studies in split 'train' to fit the probe on")
    if not test_set:
        raise ValueError(f"{data}: no labelled studies in split {split!r}")
    if train_limit is not None:
        if train_limit < 2:
            raise ValueError(f"--train-limit must be >= 2, got {train_limit}")
        train_set = train_set[:train_limit]
    cache = volume_cache(cfg.spec, cache_dir)
    build_cache(cache, train_set + test_set, progress)
    vol_tr, vol_te = CachedVolumes(cache, train_set), CachedVolumes(cache, test_set)
    y_tr = np.stack([s.labels for s in train_set])
    y_te = np.stack([s.labels for s in test_set])
    bs = cfg.train.batch_size

    t0 = time.perf_counter()
    emb_tr = embed_images(model, vol_tr, device, bs).numpy()
    emb_te = embed_images(model, vol_te, device, bs)
    prompt_emb, rows = prompt_embeddings(model, device)
    margins, _ = zero_shot_scores(emb_te, prompt_emb, rows, model.scale().item())
    zs = zero_shot_metrics(margins, y_te)
    with torch.no_grad():
        # the text tower applies text.keep_sentences itself, as to every text it encodes
        report_emb = model.encode_texts([s.findings_text for s in test_set], device).cpu()
    read_out = zero_shot_metrics(zero_shot_scores(report_emb, prompt_emb, rows, 1.0)[0], y_te)
    probe_auc = per_finding_auroc(linear_probe(emb_tr, y_tr, emb_te.numpy()), y_te)
    ids = load_catalogue().ids
    columns = {
        "zero_shot": [zs["per_finding"][f]["auroc"] for f in ids],
        "report_read_out": [read_out["per_finding"][f]["auroc"] for f in ids],
        "linear_probe": probe_auc,
    }
    seconds = {"probe": time.perf_counter() - t0}
    supervised_meta: dict = {}
    if supervised_steps:
        t0 = time.perf_counter()
        # checkpoint chosen on validation, as the contrastive run's: the same validation studies and cadence
        val_set = [s for s in studies if s.split == "validation" and s.labels is not None]
        if cfg.train.eval_studies:
            val_set = val_set[: cfg.train.eval_studies]
        if not val_set:
            raise ValueError(f"{data}: no labelled validation studies to choose the supervised checkpoint on")
        build_cache(cache, val_set, progress)
        vol_val, y_val = CachedVolumes(cache, val_set), np.stack([s.labels for s in val_set])
        for variant in ("mask", "negative") if supervised_unlabelled_variant else ("mask",):
            per_seed, picks = [], []
            for k in range(supervised_seeds):
                sup, pick = train_supervised(
                    cfg.image.arch,
                    vol_tr,
                    y_tr,
                    supervised_steps,
                    bs,
                    cfg.optim.lr,
                    cfg.optim.weight_decay,
                    seed=seed + k,
                    progress=progress,
                    frozen_stages=cfg.image.frozen_stages,
                    pool=cfg.image.pool,
                    input_size=cfg.spec.spatial_size,
                    stem_pool=cfg.image.stem_pool,
                    val_volumes=vol_val,
                    val_labels=y_val,
                    eval_every=cfg.train.eval_every or supervised_steps,
                    unlabelled=variant,
                    device=device,
                )
                per_seed.append(per_finding_auroc(_predict(sup, vol_te, bs), y_te))
                picks.append(pick)
            name = "supervised" if variant == "mask" else "supervised_unlabelled_as_negative"
            columns[name] = [
                None if any(v[j] is None for v in per_seed) else float(np.mean([v[j] for v in per_seed]))
                for j in range(len(ids))
            ]
            supervised_meta[name] = {
                "seeds": [seed + k for k in range(supervised_seeds)],
                "macro_auroc_per_seed": [_nanmean(v) for v in per_seed],
                "selected": picks,
                "unlabelled": variant,
                "validation_studies": len(val_set),
            }
        seconds["supervised"] = time.perf_counter() - t0

    result = {
        "meta": {
            "run": str(run),
            "checkpoint": checkpoint,
            "split": split,
            "data": str(data),
            "train_studies": len(train_set),
            "test_studies": len(test_set),
            "supervised_steps": supervised_steps,
            "batch_size": bs,
            "arch": cfg.image.arch,
            "seconds": seconds,
            "config_digest": cfg.digest(),
            "corpus": corpus_identity(data),
            "supervised": supervised_meta,
        },
        "macro_auroc": {k: _nanmean(v) for k, v in columns.items()},
        "per_finding": {
            fid: {k: v[j] for k, v in columns.items()}
            | {"test_n": int((y_te[:, j] != -1).sum()), "test_positives": int((y_te[:, j] == 1).sum())}
            for j, fid in enumerate(ids)
        },
    }
    name = "probe.json" if checkpoint == "best" else f"probe_{checkpoint}.json"
    path = run / name
    write_json(path, result)
    return path, format_probe(result)


def corpus_identity(data: str | Path) -> dict | None:
    """What names a generated corpus (its ``corpus.json``: generator, version, seed, studies, profile); None for
    data without one (a release or a manifest), which is then named by its split sizes only."""
    import json

    try:
        rec = json.loads((Path(data) / "corpus.json").read_text())
        conf = rec["config"]
        return {
            "generator": str(rec.get("generator", "")).split(" ")[0],
            "corpus_version": rec.get("corpus_version"),
            "seed": conf.get("seed"),
            "studies": rec.get("studies"),
            "profile": conf.get("profile"),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _nanmean(values) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def format_probe(result: dict) -> str:
    cols = list(result["macro_auroc"])

    def fmt(x) -> str:
        return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.3f}"

    lines = [
        f"AUROC on {result['meta']['split']} ({result['meta']['test_studies']} studies), probe fitted on "
        f"{result['meta']['train_studies']} training studies"
        + (f", supervised reference: {result['meta']['supervised_steps']} steps" if "supervised" in cols else ""),
        f"{'finding':32s}" + "".join(f"{c:>14s}" for c in cols),
    ]
    for fid, row in result["per_finding"].items():
        lines.append(f"{fid:32s}" + "".join(f"{fmt(row[c]):>14s}" for c in cols))
    lines.append(f"{'macro':32s}" + "".join(f"{fmt(result['macro_auroc'][c]):>14s}" for c in cols))
    return "\n".join(lines)
