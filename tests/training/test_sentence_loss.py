"""The sentence-level loss (joint.match=sentences): what it rewards, and exact under two processes."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from tests.training.test_loss_ddp import _free_port
from training.loss import sentence_loss, text_keys

WORLD, LOCAL = 2, 3
# each image's text as its sentences; "normal" and "cyst" recur within and across the two ranks
TEXTS = [["normal"], ["cyst", "stone"], ["cyst"], ["normal"], ["stone", "mass"], ["cyst", "normal"]]


def _units(texts):
    """(distinct sentences, (image, sentence) pairs) as TextEncoder.sentence_units gives them."""
    units: dict[str, int] = {}
    pairs = [(i, units.setdefault(s, len(units))) for i, t in enumerate(texts) for s in t]
    return list(units), torch.tensor(sorted(set(pairs)))


class Toy(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.img = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
        self.words = nn.Embedding(4, 5)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        # as DualEncoder: a bias only for the sigmoid loss (DDP does not average a bucket holding an
        # unused parameter, so the softmax model must not have one)
        self.logit_bias = nn.Parameter(torch.tensor(-1.5)) if kind == "sigmoid" else None
        self.vocab = {"normal": 0, "cyst": 1, "stone": 2, "mass": 3}

    def forward(self, x, units):
        w = self.words(torch.tensor([self.vocab[u] for u in units]))
        return F.normalize(self.img(x), dim=-1), F.normalize(w, dim=-1), self.logit_scale.exp()


def _images():
    return torch.randn(WORLD * LOCAL, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# the locked tower's features of each word: "cyst" and "mass" are neighbours (cosine 0.8)
FEATURES = {"normal": [1.0, 0.0, 0.0], "cyst": [0.0, 1.0, 0.0], "stone": [0.0, 0.0, 1.0], "mass": [0.0, 0.8, 0.6]}


def _loss(model, x, texts, kind, neighbours=0.0):
    units, pairs = _units(texts)
    img, sent, scale = model(x, units)
    bias = (model.module if hasattr(model, "module") else model).logit_bias
    feats = torch.tensor([FEATURES[u] for u in units], dtype=torch.float64)
    return sentence_loss(img, sent, text_keys(units), pairs, scale, bias, kind, feats, neighbours)


def _worker(rank, port, out, kind, neighbours):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(1)
    model = nn.parallel.DistributedDataParallel(Toy(kind).double())
    sl = slice(rank * LOCAL, (rank + 1) * LOCAL)
    loss = _loss(model, _images()[sl], TEXTS[sl], kind, neighbours)
    loss.backward()
    out[rank] = {k: p.grad.detach().clone() for k, p in model.module.named_parameters() if p.grad is not None}
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("neighbours", [0.0, 0.7], ids=["", "neighbours"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_two_process_gradients_equal_single_process(kind, neighbours):
    torch.manual_seed(1)
    ref_model = Toy(kind).double()
    _loss(ref_model, _images(), TEXTS, kind, neighbours).backward()
    ref = {k: p.grad for k, p in ref_model.named_parameters() if p.grad is not None}
    assert "words.weight" in ref and "img.0.weight" in ref

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out, kind, neighbours), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        assert set(out[rank]) == set(ref)
        for k, g in ref.items():
            err = (out[rank][k] - g).abs().max()
            assert torch.allclose(out[rank][k], g, atol=1e-5, rtol=0), f"rank {rank} {k}: {err}"


def test_sigmoid_is_the_pairwise_binary_loss():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    sent = F.normalize(torch.randn(2, 4, generator=g), dim=-1)
    pairs = torch.tensor([[0, 0], [1, 0], [1, 1]])  # image 2 states neither sentence
    s, b = torch.tensor(5.0), torch.tensor(-2.0)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    logits = s * img @ sent.T + b
    expected = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / 3
    got = sentence_loss(img, sent, text_keys(["a", "b"]), pairs, s, b, "sigmoid")
    assert torch.allclose(got, expected)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_each_finding_sentence_is_matched_not_the_report_mean(kind):
    # Image 1 states two findings. An image embedding equal to one of its sentences scores worse than
    # one between both, and one pointing at another image's sentence worse still.
    g = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(3, 16, generator=g), dim=-1)  # normal, cyst, stone: near-orthogonal
    units, pairs = ["normal", "cyst", "stone"], torch.tensor([[0, 0], [1, 1], [1, 2]])
    keys = text_keys(units)
    s, b = torch.tensor(20.0), torch.tensor(-8.0)

    def loss(img1):
        img = torch.stack([base[0], F.normalize(img1, dim=-1)])
        return sentence_loss(img, base, keys, pairs, s, b if kind == "sigmoid" else None, kind)

    both, one, wrong = loss(base[1] + base[2]), loss(base[1]), loss(base[0])
    assert wrong > one
    if kind == "sigmoid":  # every sentence a separate decision: both findings must be matched
        assert both < one


def test_duplicate_sentences_count_once_and_the_unknown_kind_is_refused():
    g = torch.Generator().manual_seed(6)
    img = F.normalize(torch.randn(2, 4, generator=g), dim=-1)
    sent = F.normalize(torch.randn(2, 4, generator=g), dim=-1)
    pairs = torch.tensor([[0, 0], [1, 1]])
    s = torch.tensor(3.0)
    one = sentence_loss(img, sent[:1], text_keys(["x"]), torch.tensor([[0, 0], [1, 0]]), s, None, "softmax")
    # the same sentence twice under one key (as two ranks would hold it): the first copy is the column
    two = sentence_loss(img, sent[[0, 0]], text_keys(["x", "x"]), pairs, s, None, "softmax")
    assert torch.allclose(one, two)
    with pytest.raises(ValueError, match="sigmoid' or 'softmax"):
        sentence_loss(img, sent, text_keys(["x", "y"]), pairs, s, None, "hinge")


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_neighbour_sentences_are_neither_positive_nor_negative(kind):
    # Image 0 states "cyst"; "mass" (cosine 0.8 to "cyst") is another image's sentence. With
    # neighbours=0.7 pointing image 0 at "mass" costs nothing extra; without, it is a negative.
    units, pairs = ["cyst", "mass", "normal"], torch.tensor([[0, 0], [1, 1], [2, 2]])
    feats = torch.tensor([FEATURES[u] for u in units])
    sent = torch.eye(3)
    s, b = torch.tensor(10.0), torch.tensor(-5.0)

    def loss(img0, neighbours):
        img = torch.stack([F.normalize(img0, dim=0), sent[1], sent[2]])
        return sentence_loss(
            img, sent, text_keys(units), pairs, s, b if kind == "sigmoid" else None, kind, feats, neighbours
        )

    toward_mass = torch.tensor([1.0, 1.0, 0.0])
    assert loss(toward_mass, 0.0) > loss(sent[0], 0.0)
    plain, masked = loss(toward_mass, 0.7), loss(sent[0], 0.7)
    assert plain < loss(toward_mass, 0.0) and masked <= loss(sent[0], 0.0)
    # and an unrelated sentence ("normal", cosine 0) stays a negative
    assert loss(torch.tensor([1.0, 0.0, 1.0]), 0.7) > masked
    with pytest.raises(ValueError, match="features"):
        sentence_loss(sent, sent, text_keys(units), pairs, s, None, kind, None, 0.7)
