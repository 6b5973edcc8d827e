"""``ct-zeroshot-train encode-prompts``: a site's findings file baked into a copy of a model package.

For packages that cannot encode prompts at deploy time (a converted Merlin: its Longformer misses ONNX
parity, so it ships prompt embeddings only), the torch text tower encodes the findings file's prompts
here and a new package is written whose catalogue and prompt table hold them (after the package's own
findings, or instead of them with ``--findings-mode replace``). The text tower comes from where the
package came from: a ct-zeroshot run (``--run``), or Merlin's checkpoint with Clinical-Longformer's
folder (``--checkpoint``, ``--text-model``). It must be the package's own: it re-encodes the package's
prompts first and is refused unless it reproduces their embeddings (1e-4).

The new package: every file of the original copied, the prompt table rewritten, the manifest's
findings, checksums, a model UID derived from the new weights' digest (so its SRs never reuse the
original's UIDs) and provenance (the source package, the findings file's digest, the text tower)
updated. Written into a temporary folder renamed at the end; the original is never touched.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from operators.contract.custom_findings import read_findings_file, with_findings
from operators.contract.package import MANIFEST, load_package, write_manifest
from operators.contract.prompts import prompt_table

PARITY_TOL = 1e-4


class EncodeError(ValueError):
    """Inputs that cannot make a package with custom findings; the message says which and why."""


def text_tower(run=None, checkpoint=None, text_model=None, run_checkpoint: str = "best"):
    """The torch dual encoder whose text side encodes prompts: a run's, or Merlin's."""
    if (run is None) == (checkpoint is None):
        raise EncodeError("give the text tower as --run RUN, or as --checkpoint MERLIN.pt with --text-model DIR")
    if run is not None:
        from .run_folder import load_run

        return load_run(run, run_checkpoint, device="cpu")[0].eval()
    if text_model is None:
        raise EncodeError("--checkpoint needs --text-model (Clinical-Longformer's config and tokenizer folder)")
    from .convert_merlin import build_merlin_model, load_merlin_state, read_checkpoint

    model = build_merlin_model(text_model)
    load_merlin_state(model, read_checkpoint(checkpoint), str(checkpoint))
    return model.eval()


def encode_prompts(
    package: str | Path,
    findings: str | Path,
    out: str | Path,
    *,
    mode: str = "add",
    run: str | Path | None = None,
    checkpoint: str | Path | None = None,
    text_model: str | Path | None = None,
    log: Callable[[str], None] = print,
):
    """Write ``out``: ``package`` with the findings file's findings; returns the loaded new package."""
    from .export import _model_uid, embed_prompts

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EncodeError(f"{out}: output folder exists and is not empty")
    pkg = load_package(package)
    if out.resolve() == pkg.root.resolve():
        raise EncodeError(f"{out}: the output must be a new folder, not the package itself")
    ff = read_findings_file(findings, pkg.manifest.private_scheme.scheme)
    model = text_tower(run, checkpoint, text_model)

    def encode(texts: list[str]) -> np.ndarray:
        return embed_prompts(model, texts)

    # The tower must be the package's: its own prompts, re-encoded, give its prompt table.
    prompts, _ = prompt_table(pkg.catalogue)
    if len(prompts) != len(pkg.prompt_embeddings):
        raise EncodeError(f"model package {pkg.root}: its prompt table does not hold its catalogue's prompts")
    again = encode(prompts)
    if again.shape != pkg.prompt_embeddings.shape:
        raise EncodeError(f"text tower embeds in {again.shape[1]} dimensions, the package in {pkg.embedding_dim}")
    diff = float(np.abs(again - pkg.prompt_embeddings).max())
    if diff > PARITY_TOL:
        raise EncodeError(
            f"this text tower does not reproduce model package {pkg.root}'s prompt embeddings (max |diff| "
            f"{diff:.2e} > {PARITY_TOL}): another run or checkpoint than the package was made from"
        )
    log(f"text tower reproduces the package's {len(prompts)} prompt embeddings (max |diff| {diff:.1e})")
    view = with_findings(pkg, ff, mode, encode)

    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pkg.root, tmp, ignore=shutil.ignore_patterns(MANIFEST))
    table = tmp / view.manifest.prompt_embeddings.file
    np.save(table, view.prompt_embeddings)
    identity = view.manifest.model
    manifest = dataclasses.replace(
        view.manifest,
        model=dataclasses.replace(
            identity,
            uid=_model_uid(tmp, view.manifest.text_encoder),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        ),
        provenance={
            **view.manifest.provenance,
            "custom_findings": {
                **view.custom_findings.to_dict(),
                "source_package": {"name": identity.name, "version": identity.version, "uid": identity.uid},
                "text_tower": {"run": str(run)} if run is not None else {"checkpoint": Path(str(checkpoint)).name},
                "prompt_parity_max_abs_diff": diff,
            },
        },
    )
    write_manifest(tmp, manifest)
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(tmp, out)
    new = load_package(out)
    log(
        f"model package {out}: {len(new.catalogue)} findings ({', '.join(ff.ids)} from {Path(findings).name}, "
        f"{mode} mode), model UID {new.uid}"
    )
    return new
