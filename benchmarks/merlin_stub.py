"""Stand-ins for Merlin's files, for exercising the converter and benchmarking at Merlin's size offline.

- ``random_merlin_state_dict``: random tensors with every name and shape of the official checkpoint
  (``merlin_checkpoint_keys.tsv``, 1,208 tensors: I3D ResNet-152, Clinical-Longformer, projection,
  ``logit_scale``). Batch-norm statistics are kept plausible so activations stay finite.
- ``write_longformer_stub``: a folder with Clinical-Longformer's published configuration and a byte-level
  BPE tokenizer with RoBERTa's special tokens learnt from the prompts (the real vocabulary is not
  available offline; only token ids differ, not the architecture).

Nothing here is Merlin's weights or vocabulary; it is what the tests and the full-size converter check
(docs/model-package.md) use.
"""

from __future__ import annotations

import ast
import json
from importlib import resources
from pathlib import Path

import torch

from operators.contract.findings import load_catalogue

_LONGFORMER = json.loads((Path(__file__).parent / "clinical_longformer.json").read_text())
CLINICAL_LONGFORMER: dict = _LONGFORMER["config"]
# Merlin's text architecture scaled down for tests.
SMALL_LONGFORMER: dict = _LONGFORMER["small_for_tests"]


def merlin_shapes() -> dict[str, tuple]:
    """Every tensor name of Merlin's checkpoint with its shape, in checkpoint order."""
    text = resources.files("training").joinpath("merlin_checkpoint_keys.tsv").read_text()  # package data
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            out[name] = tuple(ast.literal_eval(shape))
    return out


def random_merlin_state_dict(seed: int = 0, logit_scale: float = 2.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in merlin_shapes().items():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(100)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=g) + 0.5
        elif name == "logit_scale":
            sd[name] = torch.tensor(float(logit_scale))
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.02
    return sd


def write_longformer_stub(out: str | Path, **overrides) -> Path:
    """Clinical-Longformer's config (or a variant: ``overrides``) and a stand-in tokenizer in ``out``."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import LongformerConfig, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    LongformerConfig(**{**CLINICAL_LONGFORMER, **overrides}).save_pretrained(out)
    texts = [p for f in load_catalogue() for p in (*f.positive_prompts, *f.negative_prompts)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts * 3, vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    backend = bpe._tokenizer
    backend.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=4096, **_LONGFORMER["special_tokens"]
    ).save_pretrained(out)
    return out


def write_random_checkpoint(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_merlin_state_dict(seed), path)
    return path


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.merlin_stub",
        description="write a random-weight checkpoint in Merlin's layout and a Clinical-Longformer stand-in folder",
    )
    p.add_argument("--out", required=True, help="folder: merlin_random.pt and clinical-longformer/ are written here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    ckpt = write_random_checkpoint(out / "merlin_random.pt", args.seed)
    text = write_longformer_stub(out / "clinical-longformer")
    print(f"checkpoint: {ckpt}\ntext model: {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
