"""The self-supervised image pretext: exact resume, and an init the image tower must fit."""

import pytest
import torch

from training.config import TrainConfig
from training.research.pretrain import INIT_FILE, pretrain_image
from training.train import train

PRE = [
    "pretrain.steps=4",
    "pretrain.batch_size=4",
    "pretrain.checkpoint_every=2",
    "pretrain.warmup_steps=1",
]


@pytest.fixture(scope="module")
def pretext(corpus200, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretext")
    cfg = TrainConfig.load("cpu-tiny", PRE)
    whole = pretrain_image(corpus200, root / "whole", cfg, cache_dir=root / "cache", progress=False)
    assert whole["finished"] and (root / "whole" / INIT_FILE).exists()
    return {"root": root, "cfg": cfg, "data": corpus200}


def test_a_resumed_pretext_ends_with_the_same_weights(pretext):
    root, cfg, data = pretext["root"], pretext["cfg"], pretext["data"]
    cut = pretrain_image(data, root / "cut", cfg, cache_dir=root / "cache", stop_after=2, progress=False)
    assert not cut["finished"] and not (root / "cut" / INIT_FILE).exists()  # nothing looks complete
    pretrain_image(data, root / "cut", cfg, cache_dir=root / "cache", progress=False)
    a = torch.load(root / "whole" / INIT_FILE, weights_only=False)["state_dict"]
    b = torch.load(root / "cut" / INIT_FILE, weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = torch.load(root / "whole" / "checkpoints" / "last.pt", weights_only=False)
    assert init["step"] == 4


def test_train_starts_from_the_init_and_refuses_another_architecture(pretext, tmp_path):
    root, data = pretext["root"], pretext["data"]
    init = root / "whole" / INIT_FILE
    small = [
        "train.batch_size=8",
        "train.steps=1",
        "train.eval_every=1",
        "train.eval_studies=8",
        "text.vocab_size=400",
        "text.hidden=32",
        "text.layers=1",
        "text.heads=2",
        "text.max_length=64",
    ]
    cfg = TrainConfig.load("cpu-tiny", [*small, f"image.init={init}"])
    train(data, tmp_path / "ok", cfg, cache_dir=root / "cache", stop_after=0, progress=False)
    start = torch.load(tmp_path / "ok" / "checkpoints" / "init.pt", weights_only=False)["model"]
    sd = torch.load(init, weights_only=False)["state_dict"]
    assert all(torch.equal(start["encode_image." + k], v) for k, v in sd.items())
    other = TrainConfig.load("cpu-tiny", [*small, "image.arch=resnet18_small", f"image.init={init}"])
    with pytest.raises(ValueError, match=r"does not fit the image tower: it was made for 'resnet10_tiny'.*keys"):
        train(data, tmp_path / "bad", other, cache_dir=root / "cache", progress=False)
