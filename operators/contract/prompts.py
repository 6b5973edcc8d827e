"""The layout of a model package's prompt table (``prompt_embeddings.npy``, (P, D) float32): every
finding's positive prompts, then its negatives, finding after finding; ``FindingRows`` says where."""

from __future__ import annotations

from dataclasses import dataclass

from .findings import Catalogue


@dataclass(frozen=True)
class FindingRows:
    """Rows of ``prompt_embeddings.npy`` holding one finding's positive and negative prompts."""

    positive: tuple[int, int]
    negative: tuple[int, int]


def prompt_table(catalogue: Catalogue | None = None) -> tuple[list[str], list[FindingRows]]:
    """Every finding's prompts in one list (positives then negatives per finding) and the rows of each
    finding: the layout of ``prompt_embeddings.npy``. Default: the project's catalogue."""
    from .findings import load_catalogue

    prompts: list[str] = []
    rows = []
    for f in catalogue or load_catalogue():
        p0 = len(prompts)
        prompts.extend(f.positive_prompts)
        n0 = len(prompts)
        prompts.extend(f.negative_prompts)
        rows.append(FindingRows((p0, n0), (n0, len(prompts))))
    return prompts, rows
