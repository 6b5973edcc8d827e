"""The distributed InfoNCE gives the same gradients as one process on the global batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from training.loss import clip_loss, text_keys

WORLD, LOCAL = 2, 4


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.img = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
        self.txt = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t):
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(t), dim=-1), self.logit_scale.exp()


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * LOCAL, 8, generator=g, dtype=torch.float64), torch.randn(
        WORLD * LOCAL, 6, generator=g, dtype=torch.float64
    )


KEYS = text_keys(["liver : normal", "a", "liver : normal", "b", "c", "liver : normal", "b", "d"])


def _worker(rank, port, out, keys=None):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(1)
    model = nn.parallel.DistributedDataParallel(Toy().double())
    x, t = _data()
    sl = slice(rank * LOCAL, (rank + 1) * LOCAL)
    loss = clip_loss(*model(x[sl], t[sl]), keys=None if keys is None else keys[sl])
    loss.backward()
    out[rank] = {k: p.grad.detach().clone() for k, p in model.module.named_parameters()}
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("keys", [None, KEYS], ids=["plain", "multi-positive"])
def test_two_process_gradients_equal_single_process(keys):
    torch.manual_seed(1)
    ref_model = Toy().double()
    x, t = _data()
    clip_loss(*ref_model(x, t), keys=keys).backward()
    ref = {k: p.grad for k, p in ref_model.named_parameters()}

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(_free_port(), out, keys), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        for k, g in ref.items():
            assert torch.allclose(out[rank][k], g, atol=1e-5, rtol=0), (
                f"rank {rank} {k}: {(out[rank][k] - g).abs().max()}"
            )


def test_single_process_loss_is_symmetric_infonce():
    img = F.normalize(torch.randn(6, 4), dim=-1)
    txt = F.normalize(torch.randn(6, 4), dim=-1)
    s = torch.tensor(10.0)
    logits = s * img @ txt.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(clip_loss(img, txt, s), expected)
    # Perfect alignment with a large scale gives a loss near zero.
    assert clip_loss(img, img, torch.tensor(1000.0)) < 1e-3


def test_multi_positive_equals_infonce_when_all_texts_differ():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(8, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(8, 5, generator=g), dim=-1)
    s = torch.tensor(7.0)
    keys = text_keys([f"text {i}" for i in range(8)])
    assert torch.allclose(clip_loss(img, txt, s, keys=keys), clip_loss(img, txt, s), atol=1e-6)


def test_multi_positive_treats_identical_texts_as_positives():
    # Items 0, 2 and 4 share one text, so their text embeddings are identical. Images that match
    # their text perfectly: plain InfoNCE still pays ~log(3) on those rows, the multi-positive loss
    # goes to zero with the scale.
    g = torch.Generator().manual_seed(4)
    texts = ["normal", "a", "normal", "b", "normal", "c"]
    base = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    which = {"normal": 0, "a": 1, "b": 2, "c": 3}
    txt = torch.stack([base[which[t]] for t in texts])
    img = txt.clone()
    s = torch.tensor(200.0)
    keys = text_keys(texts)
    assert clip_loss(img, txt, s, keys=keys) < 1e-3
    assert clip_loss(img, txt, s) > 0.5 * torch.log(torch.tensor(3.0)) - 1e-4  # 3 of 6 rows pay log(3)
    # and the positives are only the identical texts: a mismatched image is still penalised
    img_bad = img.clone()
    img_bad[1] = base[2]
    assert clip_loss(img_bad, txt, s, keys=keys) > 1.0


def test_text_keys_are_stable_and_equal_for_equal_texts():
    k = text_keys(["x", "y", "x"])
    assert k[0] == k[2] and k[0] != k[1]
    assert text_keys(["x"])[0] == k[0]  # no per-process salt (Python's hash() would differ)
