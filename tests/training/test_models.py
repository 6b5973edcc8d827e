import pytest
import torch

from benchmarks.merlin_stub import random_merlin_state_dict
from training.models.image import ARCHS, ImageEncoder


def _merlin_image_state_dict() -> dict[str, torch.Tensor]:
    return {k: v for k, v in random_merlin_state_dict().items() if k.startswith("encode_image.")}


def test_merlin_layout_state_dict_loads_strictly():
    sd = _merlin_image_state_dict()
    assert len(sd) > 900
    enc = ImageEncoder("i3_resnet152", embed_dim=512, n_classes=1692)
    prefix = "encode_image."
    result = enc.load_state_dict({k[len(prefix) :]: v for k, v in sd.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got = enc.state_dict()
    assert set(prefix + k for k in got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k[len(prefix) :]], v)
    n = sum(p.numel() for p in enc.parameters())
    assert 120e6 < n < 124e6  # ~121.9 M with the phecode classifier


def test_merlin_encoder_shapes_and_stem():
    enc = ImageEncoder("i3_resnet152", embed_dim=512).eval()
    conv1 = enc.i3_resnet.conv1
    assert conv1.kernel_size == (3, 7, 7) and conv1.stride == (1, 2, 2) and conv1.padding == (1, 3, 3)
    assert conv1.in_channels == 3
    with torch.no_grad():
        out = enc(torch.rand(1, 1, 64, 64, 32))  # (B, 1, X, Y, Z)
    assert out.shape == (1, 512)


def test_input_is_permuted_depth_first():
    """(B,1,X,Y,Z) -> (B,1,Z,X,Y): a feature only along Z must reach the depth axis of the trunk."""
    enc = ImageEncoder("resnet10_tiny", embed_dim=16).eval()
    seen = {}

    def hook(module, inputs, output):
        seen["shape"] = inputs[0].shape

    enc.i3_resnet.conv1.register_forward_hook(hook)
    with torch.no_grad():
        enc(torch.rand(2, 1, 40, 36, 24))
    assert tuple(seen["shape"]) == (2, 1, 24, 40, 36)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_builds(arch):
    enc = ImageEncoder(arch, embed_dim=32)
    assert enc.i3_resnet.contrastive_head.out_channels == 32


def test_a_stride_1_last_stage_doubles_the_last_feature_map_and_shares_the_rest():
    from training.models.image import _map_shape

    assert _map_shape(ARCHS["resnet10_wide"], (64, 56, 56)) == (2, 2, 2)
    assert _map_shape(ARCHS["resnet10_wide_s1"], (64, 56, 56)) == (4, 4, 4)
    torch.manual_seed(0)
    a = ImageEncoder("resnet10_wide", 16)
    torch.manual_seed(0)
    b = ImageEncoder("resnet10_wide_s1", 16)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # the same weights, seed for seed
    x = torch.rand(1, 1, 56, 64, 56)  # (B, C, Z, X, Y) as the trunk takes it
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a.i3_resnet.trunk(x, 4), b.i3_resnet.trunk(x, 4))  # stem and layer1..3 alike
        assert a.i3_resnet.trunk(x, 5).shape[2:] == (2, 2, 2) and b.i3_resnet.trunk(x, 5).shape[2:] == (4, 4, 4)
        assert b(torch.rand(1, 1, 64, 56, 56)).shape == (1, 16)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown image architecture 'resnet9000'"):
        ImageEncoder("resnet9000", 32)


def test_dual_encoder_names_follow_merlin(tmp_path):
    from training.models.clip import DualEncoder
    from training.models.text import TextEncoder, build_small_text_model, train_wordpiece

    tok = train_wordpiece(["FINDINGS: Liver: Normal. Spleen: Mild splenomegaly."] * 5, 60, tmp_path)
    build_small_text_model(tok, hidden=32, layers=1, heads=2, max_len=64, out_dir=tmp_path)
    model = DualEncoder(ImageEncoder("resnet10_tiny", 16), TextEncoder(tmp_path, 16, 62))
    names = list(model.state_dict())
    assert "logit_scale" in names
    assert any(n.startswith("encode_image.i3_resnet.conv1") for n in names)
    assert any(n.startswith("encode_text.text_encoder.") for n in names)
    assert "encode_text.linear_layer.weight" in names
    emb = model.encode_texts(["Liver: normal.", "spleen : mild splenomegaly"])
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize(
    "norm,image_centred,text_centred",
    [("none", False, False), ("batch", True, True), ("batch_affine", True, True), ("text", False, True)],
)
def test_embed_norms_centre_the_towers_they_name(tmp_path, norm, image_centred, text_centred):
    from training.config import TrainConfig
    from training.models.clip import DualEncoder
    from training.models.text import TextEncoder, build_small_text_model, train_wordpiece

    assert TrainConfig.load("cpu-tiny", [f"joint.embed_norm={norm}"]).joint.embed_norm == norm
    tok = train_wordpiece(["FINDINGS: Liver: Normal."] * 5, 40, tmp_path)
    build_small_text_model(tok, hidden=16, layers=1, heads=2, max_len=32, out_dir=tmp_path)
    model = DualEncoder(ImageEncoder("resnet10_tiny", 8), TextEncoder(tmp_path, 8, 30), embed_norm=norm)
    assert isinstance(model.image_norm, torch.nn.BatchNorm1d) == image_centred
    assert isinstance(model.text_norm, torch.nn.BatchNorm1d) == text_centred


@pytest.mark.parametrize("frozen", [1, 3])
def test_frozen_image_stages_train_the_rest_on_cached_trunk_output(frozen):
    """image.frozen_stages: the trunk's output fed to the rest equals the whole tower; the frozen stages
    (batch norm included) never change in training, the rest does."""
    torch.manual_seed(0)
    enc = ImageEncoder("resnet10_tiny", 16, frozen_stages=frozen)
    x = torch.rand(4, 1, 64, 56, 56)
    stem = enc.i3_resnet.conv1.weight.clone()
    bn_mean = enc.i3_resnet.bn1.running_mean.clone()
    head = enc.i3_resnet.contrastive_head.weight.clone()
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=0.1)
    enc.train()
    trunk = enc.trunk(x)
    enc(trunk, from_trunk=True).pow(2).mean().backward()
    opt.step()
    assert torch.equal(enc.i3_resnet.conv1.weight, stem) and enc.i3_resnet.conv1.weight.grad is None
    assert torch.equal(enc.i3_resnet.bn1.running_mean, bn_mean)  # eval mode while the rest trains
    assert not torch.equal(enc.i3_resnet.contrastive_head.weight, head)
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(enc(x), enc(enc.trunk(x), from_trunk=True), atol=1e-6)
    with pytest.raises(ValueError, match="frozen_stages must be 0..4"):
        ImageEncoder("resnet10_tiny", 16, frozen_stages=5)


def test_flatten_pool_sees_where_a_feature_fires():
    """image.pool=flatten: the head is a linear map of the whole last feature map, so the same pattern in
    two places gives two embeddings (global average pooling gives one); the seed's initialisation of the
    trunk is the same as with average pooling; it needs the input size."""
    torch.manual_seed(0)
    avg = ImageEncoder("resnet10_tiny", 16, pool="avg", input_size=(64, 56, 56)).eval()
    torch.manual_seed(0)
    flat = ImageEncoder("resnet10_tiny", 16, pool="flatten", input_size=(64, 56, 56)).eval()
    assert flat.i3_resnet.contrastive_head.weight.shape == (16, 128, 2, 2, 2)  # (Z, X, Y) map of 2 x 2 x 2
    assert torch.equal(avg.i3_resnet.conv1.weight, flat.i3_resnet.conv1.weight)
    x = torch.zeros(2, 1, 64, 56, 56)
    x[0, 0, 4:12, 4:12, 4:12] = 1.0  # one corner
    x[1, 0, 52:60, 44:52, 44:52] = 1.0  # the opposite corner
    with torch.no_grad():
        f = flat(x)
        assert f.shape == (2, 16) and not torch.allclose(f[0], f[1], atol=1e-3)
        assert torch.allclose(flat(flat.trunk(x), from_trunk=True), f, atol=1e-6)
    torch.manual_seed(0)
    both = ImageEncoder("resnet10_tiny", 16, pool="both", input_size=(64, 56, 56)).eval()
    assert both.i3_resnet.contrastive_head.weight.shape == (16, 128, 1, 1, 1)  # Merlin's head, and beside it
    assert both.i3_resnet.position_head.weight.shape == (16, 128, 2, 2, 2)
    with torch.no_grad():
        b = both(x)
        torch.nn.init.zeros_(both.i3_resnet.position_head.weight)  # without the position head: the average's
        assert torch.allclose(both(x), avg(x), atol=1e-6) and not torch.allclose(b, avg(x), atol=1e-4)
    with pytest.raises(ValueError, match="needs the input size"):
        ImageEncoder("resnet10_tiny", 16, pool="flatten")
    with pytest.raises(ValueError, match="image.pool must be"):
        ImageEncoder("resnet10_tiny", 16, pool="max", input_size=(64, 56, 56))


def test_a_run_with_frozen_stages_trains_only_the_rest(tiny_package, tmp_path):
    from tests.conftest import TINY_TRAIN
    from training.config import TrainConfig
    from training.run_folder import load_run
    from training.train import train

    cfg = TrainConfig.load("cpu-tiny", TINY_TRAIN + ["image.frozen_stages=2"])
    train(tiny_package["data"], tmp_path / "run", cfg, cache_dir=tiny_package["cache"], progress=False)
    init, _ = load_run(tmp_path / "run", "init")
    last, _ = load_run(tmp_path / "run", "last")
    a, b = init.encode_image.i3_resnet, last.encode_image.i3_resnet
    assert torch.equal(a.layer1[0].conv1.weight, b.layer1[0].conv1.weight)
    assert not torch.equal(a.layer2[0].conv1.weight, b.layer2[0].conv1.weight)


def test_maxmin_stem_min_pools_half_the_channels():
    """image.stem_pool=maxmin: the first half of the stem's channels max-pooled as before, the second
    half min-pooled (never above the max), from the seed's same initial weights; the whole tower equals
    trunk-then-rest. (Measured while writing this: a 2-voxel dark spot in a bright field moves the
    random stem's pooled output less with maxmin, 2.4, than with max, 3.5: random filters of both signs
    already turn a dip into a peak, so the max-pool does not drop it.)"""
    stems = {}
    for mode in ("max", "maxmin"):
        torch.manual_seed(0)
        stems[mode] = ImageEncoder("resnet10_tiny", 16, frozen_stages=1, stem_pool=mode).eval()
    assert torch.equal(stems["max"].i3_resnet.conv1.weight, stems["maxmin"].i3_resnet.conv1.weight)
    x = torch.rand(1, 1, 64, 56, 56)
    with torch.no_grad():
        a, b = stems["max"].trunk(x), stems["maxmin"].trunk(x)
        h = a.shape[1] // 2
        assert a.shape == b.shape and torch.equal(a[:, :h], b[:, :h])
        assert (b[:, h:] <= a[:, h:]).all() and (b[:, h:] < a[:, h:]).float().mean() > 0.5
        enc = stems["maxmin"]
        assert torch.allclose(enc(x), enc(enc.trunk(x), from_trunk=True), atol=1e-6)
    with pytest.raises(ValueError, match="stem_pool must be"):
        ImageEncoder("resnet10_tiny", 16, stem_pool="min")


def test_sentence_embeddings_of_a_single_distinct_sentence_train(tmp_path):
    """A section batch whose texts all reduce to "Normal." holds one distinct sentence: batch
    normalisation then uses its running statistics instead of failing."""
    from training.models.clip import DualEncoder
    from training.models.text import TextEncoder, build_small_text_model, train_wordpiece

    tok = train_wordpiece(["normal liver", "a cyst in the kidney"], 60, tmp_path)
    build_small_text_model(tok, 16, 1, 2, 32, tmp_path)
    model = DualEncoder(ImageEncoder("resnet10_tiny", 8), TextEncoder(tmp_path, 8, 30), embed_norm="batch").train()
    one = model.sentence_embeddings(["normal ."])
    assert one.shape == (1, 8) and torch.isfinite(one).all()
    assert torch.allclose(one.norm(dim=-1), torch.ones(1))
    assert model.sentence_embeddings(["normal .", "a cyst ."]).shape == (2, 8)
