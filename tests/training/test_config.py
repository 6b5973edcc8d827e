import pytest

from training.config import ConfigError, TrainConfig, parse_ratio


def test_presets_load_and_resolve(tmp_path):
    assert {"cpu-tiny", "merlin"} <= set(TrainConfig.presets())
    cfg = TrainConfig.load(
        "cpu-tiny",
        ["train.steps=7", "sampler.kind=balanced", "sampler.ratio=25:75", "batching.sections=[liver, spleen]"],
    )
    assert cfg.train.steps == 7 and cfg.sampler.kind == "balanced" and cfg.batching.sections == ["liver", "spleen"]
    cfg.save(tmp_path / "c.yaml")
    again = TrainConfig.load(str(tmp_path / "c.yaml"))
    assert again == cfg and again.digest() == cfg.digest()
    with pytest.raises(ConfigError, match="text.model: the merlin preset trains a pretrained text tower"):
        TrainConfig.load("merlin")  # it built a from-scratch BERT without a word
    merlin = TrainConfig.load("merlin", [f"text.model={tmp_path}"])
    assert merlin.image.arch == "i3_resnet152" and merlin.spec.spatial_size == (224, 224, 160)


@pytest.mark.parametrize(
    "value,expected", [("25:75", (0.25, 0.75)), ("1:1", (0.5, 0.5)), ("3:1", (0.75, 0.25)), ([50, 50], (0.5, 0.5))]
)
def test_ratio(value, expected):
    assert parse_ratio(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sampler.ratio=fifty-fifty"], "sampler.ratio 'fifty-fifty' does not parse"),
        (["sampler.ratio=0:0"], "not both 0"),
        (["batching.sections=[liver, brain]"], r"unknown section\(s\) \['brain'\]"),
        (["sampler.kind=stratified"], "sampler.kind 'stratified'"),
        (["train.steps=many"], "train.steps: expected an integer"),
        (["train.colour=red"], r"unknown config key\(s\) \['train.colour'\]"),
        (["sampler.data_fraction=1.5"], r"sampler.data_fraction must be in \(0, 1\]"),
        (["trainsteps"], "must be key=value"),
    ],
)
def test_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load("cpu-tiny", overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset 'gpu-huge' does not exist; available: .*cpu-tiny"):
        TrainConfig.load("gpu-huge")


def test_ratio_in_yaml_must_be_quoted(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("sampler: {kind: balanced, ratio: 50:50}\n")
    with pytest.raises(ConfigError, match="quote it"):
        TrainConfig.load(str(f))
    f.write_text('sampler: {kind: balanced, ratio: "50:50"}\n')
    assert TrainConfig.load(str(f)).sampler.ratio == "50:50"


def test_digest_ignores_defaults_so_a_new_option_keeps_old_runs_resumable():
    cfg = TrainConfig.load("cpu-small")
    assert cfg.digest() != TrainConfig.load("cpu-small", ["train.seed=1"]).digest()
    # an option left at its default is not part of what identifies the run
    assert cfg.digest() == TrainConfig.load("cpu-small", ["sampler.order=independent"]).digest()
    assert cfg.digest() != TrainConfig.load("cpu-small", ["sampler.order=passes"]).digest()


def test_a_named_device_that_is_not_there_is_an_error(tmp_path):
    """--device on evaluate, probe and export: a GPU named where PyTorch sees none is refused, never
    replaced by the CPU."""
    import torch

    from training.devices import torch_device
    from training.evaluate_run import evaluate_run

    assert torch_device("cpu").type == "cpu"
    assert torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        torch_device("tpu")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(ValueError, match="--device cuda: PyTorch sees no CUDA device"):
        evaluate_run(tmp_path / "no-run", tmp_path, device="cuda")  # refused before anything is read
