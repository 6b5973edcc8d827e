"""Evaluation: Merlin's zero-shot rule, retrieval, and both under 3D occlusion.

- **Zero-shot** (Merlin): for each finding, the mean cosine similarity of the image to its
  positive prompts and to its negative prompts; present iff the positive mean is higher. The
  probability reported is the two-way softmax of the two means scaled by the logit scale (0.5 at
  the decision boundary). Per-finding F1 over studies whose label is not -1; macro F1 is the mean
  over findings with at least one labelled study; AUROC where both classes occur.
- **Retrieval**: Recall@1/5/10 image->report and report->image over the split (full findings text).
- **Occlusion**: one random cuboid (seeded per study) covering 10/25/50 % of the model input is set
  to 0 (air after scaling) before encoding, and both evaluations are repeated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from operators.contract.findings import load_catalogue
from operators.contract.prompts import FindingRows, prompt_table
from operators.contract.scoring import finding_scores, merlin_present

OCCLUSION_LEVELS = (0.0, 0.1, 0.25, 0.5)
RECALL_AT = (1, 5, 10)


def occlude(volume: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Zero one random cuboid covering ``fraction`` of the (1, X, Y, Z) volume."""
    if fraction <= 0:
        return volume
    out = np.array(volume, copy=True)
    shape = np.array(out.shape[1:])
    side = np.maximum(1, np.round(shape * fraction ** (1 / 3))).astype(int)
    start = [int(rng.integers(0, s - d + 1)) for s, d in zip(shape, side)]
    out[:, start[0] : start[0] + side[0], start[1] : start[1] + side[1], start[2] : start[2] + side[2]] = 0.0
    return out


@torch.no_grad()
def embed_images(
    model, volumes: Sequence, device, batch_size: int = 16, occlusion: float = 0.0, seed: int = 0, progress=None
) -> torch.Tensor:
    """L2-normalised image embeddings; ``volumes`` yields (1, X, Y, Z) arrays (e.g. the cache)."""
    model.eval()
    out = []
    for i in range(0, len(volumes), batch_size):
        chunk = [
            occlude(volumes[j], occlusion, np.random.default_rng([seed, j, int(occlusion * 1000)]))
            for j in range(i, min(i + batch_size, len(volumes)))
        ]
        x = torch.from_numpy(np.stack(chunk)).to(device)
        out.append(model.image_embeddings(x).cpu())
        if progress is not None:
            progress.update(len(chunk))
    return torch.cat(out)


@torch.no_grad()
def prompt_embeddings(model, device, findings=None) -> tuple[torch.Tensor, list[FindingRows]]:
    """(P, D) embeddings of every finding's prompts and the rows of each finding; ``findings``: a list of
    ``Finding`` (a site's findings file) instead of the catalogue."""
    model.eval()
    prompts, rows = prompt_table(findings)
    return model.encode_texts(prompts, device).cpu(), rows


def zero_shot_scores(
    image_emb: torch.Tensor, prompt_emb: torch.Tensor, rows: list[FindingRows], scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """(margin, probability) arrays of shape (N, n_findings); present by ``merlin_present``. The deploy side's
    function, so that evaluation and the deployed package apply the same rule."""
    return finding_scores(image_emb.numpy(), prompt_emb.numpy(), rows, scale)


def finding_auroc(y: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC of one finding over studies whose label is 1 or 0; None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < y.size else None


def zero_shot_metrics(
    margins: np.ndarray, labels: np.ndarray, ids: Sequence[str] | None = None, present: np.ndarray | None = None
) -> dict:
    """Per-finding and macro F1 and AUROC. ``ids``: the columns' findings (default: the catalogue);
    ``present``: the decisions (default: Merlin's rule on ``margins``)."""
    from sklearn.metrics import f1_score

    ids = load_catalogue().ids if ids is None else list(ids)
    if margins.shape[1] != len(ids) or labels.shape != margins.shape:
        raise ValueError(f"margins {margins.shape} and labels {labels.shape} for {len(ids)} findings")
    present = merlin_present(margins) if present is None else present
    per = {}
    for j, fid in enumerate(ids):
        keep = labels[:, j] != -1
        y = labels[keep, j]
        if y.size == 0:
            per[fid] = {"f1": None, "auroc": None, "n": 0, "positives": 0}
            continue
        pred = present[keep, j].astype(int)
        auroc = finding_auroc(y, margins[keep, j])
        per[fid] = {  # a finding with one class only enters no macro metric (neither F1 nor AUROC)
            "f1": float(f1_score(y, pred, zero_division=0)) if 0 < y.sum() < y.size else None,
            "auroc": auroc,
            "n": int(y.size),
            "positives": int(y.sum()),
        }
    f1s = [v["f1"] for v in per.values() if v["f1"] is not None]
    aucs = [v["auroc"] for v in per.values() if v["auroc"] is not None]
    return {
        "macro_f1": float(np.mean(f1s)) if f1s else math.nan,
        "macro_auroc": float(np.mean(aucs)) if aucs else math.nan,
        "per_finding": per,
    }


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict:
    sim = (image_emb @ text_emb.T).numpy()
    n = sim.shape[0]
    target = np.arange(n)
    out = {}
    for name, s in (("image_to_report", sim), ("report_to_image", sim.T)):
        own = s[target, target][:, None]
        above = (s > own).sum(1)  # 0 = retrieved first
        tied = (s == own).sum(1) - 1  # others scored exactly as the true match
        # ties ranked fairly: the chance that a random order of the tied puts the true match in the top k
        out[name] = {f"R@{k}": float(np.clip((k - above) / (tied + 1), 0.0, 1.0).mean()) for k in RECALL_AT}
    out["n"] = n
    return out


def macro_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """The mean over findings of each finding's AUROC on its labelled (not -1) studies; findings with a
    single class there are left out; NaN when none is left."""
    aucs = []
    for j in range(labels.shape[1]):
        keep = labels[:, j] != -1
        a = finding_auroc(labels[keep, j], probs[keep, j])
        if a is not None:
            aucs.append(a)
    return float(np.mean(aucs)) if aucs else math.nan


def macro_f1_from(pred: np.ndarray, labels: np.ndarray) -> float:
    """Macro F1 (dropping -1) from prediction and label matrices; vectorised for bootstrap loops. A
    finding with one class only (no positive or no negative label) is left out, as in macro AUROC."""
    keep = labels != -1
    tp = ((pred == 1) & (labels == 1) & keep).sum(0)
    fp = ((pred == 1) & (labels == 0) & keep).sum(0)
    fn = ((pred == 0) & (labels == 1) & keep).sum(0)
    has = ((labels == 1) & keep).any(0) & ((labels == 0) & keep).any(0)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[has].mean()) if has.any() else math.nan


def evaluate_model(
    model,
    volumes: Sequence,
    texts: list[str],
    labels: np.ndarray,
    device,
    occlusion_levels=OCCLUSION_LEVELS,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    findings=None,
    thresholds=None,
) -> dict:
    """All metrics for one split. ``volumes[i]`` is study i's model input; labels (N, n_findings) in 1/0/-1.
    ``findings`` (a list of ``Finding``) and their ``thresholds`` (probabilities) replace the catalogue and
    Merlin's 0.5 rule: a site's own findings, evaluated as the deployed package decides them."""
    from tqdm import tqdm

    from operators.contract.scoring import decide_present

    model.eval()
    prompt_emb, rows = prompt_embeddings(model, device, findings)
    ids = None if findings is None else [f.id for f in findings]
    with torch.no_grad():
        text_emb = model.encode_texts(texts, device).cpu()
    scale = model.scale().item()
    results: dict = {"occlusion": {}}
    bar = tqdm(total=len(volumes) * len(occlusion_levels), desc="evaluate", unit="vol", disable=not progress)
    for level in occlusion_levels:
        img = embed_images(model, volumes, device, batch_size, occlusion=level, seed=seed, progress=bar)
        margins, probs = zero_shot_scores(img, prompt_emb, rows, scale)
        present = None if thresholds is None else decide_present(probs, np.asarray(thresholds))
        zs = zero_shot_metrics(margins, labels, ids, present)
        rt = retrieval_metrics(img, text_emb)
        key = f"{int(round(level * 100))}%"
        results["occlusion"][key] = {
            "macro_f1": zs["macro_f1"],
            "macro_auroc": zs["macro_auroc"],
            "retrieval": {k: v for k, v in rt.items() if k != "n"},
        }
        if level == 0.0:
            results["zero_shot"] = zs
            results["retrieval"] = rt
            results["_margins"] = margins
            results["_probabilities"] = probs
    bar.close()
    return results


def format_tables(metrics: dict) -> str:
    """Human-readable tables of a metrics dict."""
    zs = metrics["zero_shot"]
    lines = [
        f"zero-shot macro F1 {zs['macro_f1']:.4f}   macro AUROC {zs['macro_auroc']:.4f}",
        "",
        f"{'finding':32s} {'F1':>6s} {'AUROC':>6s} {'n':>5s} {'pos':>4s}",
    ]
    for fid, v in zs["per_finding"].items():
        f1 = "-" if v["f1"] is None else f"{v['f1']:.3f}"
        auc = "-" if v["auroc"] is None else f"{v['auroc']:.3f}"
        lines.append(f"{fid:32s} {f1:>6s} {auc:>6s} {v['n']:>5d} {v['positives']:>4d}")
    rt = metrics["retrieval"]
    lines += ["", f"retrieval over {rt['n']} studies      " + "  ".join(f"R@{k}" for k in RECALL_AT)]
    for d in ("image_to_report", "report_to_image"):
        lines.append(f"  {d:28s} " + "  ".join(f"{rt[d][f'R@{k}']:.3f}" for k in RECALL_AT))
    lines += ["", "occlusion   macro F1  AUROC   i->r R@5  r->i R@5"]
    for lvl, v in metrics["occlusion"].items():
        lines.append(
            f"  {lvl:>4s}      {v['macro_f1']:.4f}   {v['macro_auroc']:.4f}  "
            f"{v['retrieval']['image_to_report']['R@5']:.3f}     {v['retrieval']['report_to_image']['R@5']:.3f}"
        )
    return "\n".join(lines)
