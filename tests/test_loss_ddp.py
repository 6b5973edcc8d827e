"""The distributed InfoNCE gives the same gradients as one process on the global batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from training.loss import clip_loss

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


def _worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(1)
    model = nn.parallel.DistributedDataParallel(Toy().double())
    x, t = _data()
    sl = slice(rank * LOCAL, (rank + 1) * LOCAL)
    loss = clip_loss(*model(x[sl], t[sl]))
    loss.backward()
    out[rank] = {k: p.grad.detach().clone() for k, p in model.module.named_parameters()}
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_process_gradients_equal_single_process():
    torch.manual_seed(1)
    ref_model = Toy().double()
    x, t = _data()
    clip_loss(*ref_model(x, t)).backward()
    ref = {k: p.grad for k, p in ref_model.named_parameters()}

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
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
