"""The study's figures: arms, data scaling, per-finding sensitivity, occlusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .arms import ARM_BY_NAME, SCALING_ARMS, Arm, StudyPreset
from .statistics import paper_value


def plots(preset: StudyPreset, out: Path, arms: list[Arm], stat, catalogue) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [a.name for a in arms]
    # Arms with error bars; the paper's number written above each bar (its scale differs from ours).
    fig, ax = plt.subplots(figsize=(9, 4.4))
    x = np.arange(len(arms))
    means = np.array([stat(a, "macro_f1")[0] * 100 for a in names])
    stds = np.array([np.nan_to_num(stat(a, "macro_f1")[1]) * 100 for a in names])
    ax.bar(x, means, yerr=stds, capsize=4, color="#4878a8")
    top = np.nanmax(means + stds)
    for i, a in enumerate(arms):
        ax.text(
            i,
            np.nan_to_num(means[i] + stds[i]) + 0.01 * top,
            f"paper\n{a.paper}",
            ha="center",
            va="bottom",
            fontsize=7,
            color="#c44e52",
        )
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test macro F1 (%)")
    ax.set_ylim(max(0.0, np.nanmin(means - stds) - 5), top * 1.12)
    ax.set_title(
        f"Sampler study {preset.name}: test macro F1, 30 findings (bars: mean +- std over seeds; red: the paper)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "arms.png", dpi=110)
    plt.close(fig)

    # Scaling curve.
    fig, ax = plt.subplots(figsize=(5, 3.6))
    fr = [20, 40, 100]
    m = [stat(a, "macro_f1")[0] * 100 for a in SCALING_ARMS]
    s = [np.nan_to_num(stat(a, "macro_f1")[1]) * 100 for a in SCALING_ARMS]
    ax.errorbar(fr, m, yerr=s, marker="o", capsize=4, label="ours")
    if all(a in names for a in ("subset-20-mp", "subset-100-mp")):  # the low-data method on
        mp = [(f, stat(a, "macro_f1")) for f, a in ((20, "subset-20-mp"), (100, "subset-100-mp"))]
        ax.errorbar(
            [f for f, _ in mp],
            [v[0] * 100 for _, v in mp],
            yerr=[np.nan_to_num(v[1]) * 100 for _, v in mp],
            marker="s",
            capsize=4,
            label="ours, multi-positive",
        )
    pp = [(f, paper_value(ARM_BY_NAME[a].paper)) for f, a in zip(fr, SCALING_ARMS)]
    ax.plot([f for f, p in pp if p], [p * 100 for f, p in pp if p], "D--", color="#c44e52", label="paper")
    ax.set_xlabel("% of the subset")
    ax.set_ylabel("test macro F1 (%)")
    ax.set_xticks(fr)
    ax.legend(fontsize=8)
    ax.set_title("Data scaling (random sampling)")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)

    # Per-finding heatmap.
    ids = catalogue.ids
    grid = np.array([[stat(a, f"f1/{f}")[0] * 100 for f in ids] for a in names])
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(names) + 2.2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xticks(range(len(ids)), ids, rotation=70, ha="right", fontsize=7)
    fig.colorbar(im, ax=ax, label="F1 (%)")
    ax.set_title("Per-finding test F1 (mean over seeds)")
    fig.tight_layout()
    fig.savefig(out / "per_finding.png", dpi=110)
    plt.close(fig)

    # Data sensitivity per finding: F1 gain from 20 % to 100 % of the subset, largest first.
    if all(a in names for a in ("subset-20", "subset-100")):
        gain = np.array([(stat("subset-100", f"f1/{f}")[0] - stat("subset-20", f"f1/{f}")[0]) * 100 for f in ids])
        order = np.argsort(-np.nan_to_num(gain, nan=-1e9))
        fig, ax = plt.subplots(figsize=(12, 3.8))
        ax.bar(range(len(ids)), gain[order], color=np.where(gain[order] >= 0, "#4878a8", "#c44e52"))
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(ids)), [ids[i] for i in order], rotation=70, ha="right", fontsize=7)
        ax.set_ylabel("F1 gain, 20 % -> 100 % (points)")
        ax.set_title("Data sensitivity per finding (mean over seeds)")
        fig.tight_layout()
        fig.savefig(out / "sensitivity.png", dpi=110)
        plt.close(fig)

    # Occlusion curves.
    levels = [int(round(v * 100)) for v in preset.occlusion]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for a in names:
        f1 = [stat(a, f"occlusion/{lv}%/macro_f1")[0] * 100 for lv in levels]
        r5 = [stat(a, f"occlusion/{lv}%/retrieval/image_to_report/R@5")[0] * 100 for lv in levels]
        axes[0].plot(levels, f1, marker="o", label=a)
        axes[1].plot(levels, r5, marker="o", label=a)
    axes[0].set_ylabel("test macro F1 (%)")
    axes[1].set_ylabel("image->report R@5 (%)")
    for ax in axes:
        ax.set_xlabel("% of the volume occluded")
        ax.set_xticks(levels)
    axes[1].legend(fontsize=7)
    fig.suptitle("Occlusion robustness (mean over seeds)")
    fig.tight_layout()
    fig.savefig(out / "occlusion.png", dpi=110)
    plt.close(fig)
