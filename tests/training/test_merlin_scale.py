"""The `merlin` preset's path on a CPU: torchrun with the real tower classes (Merlin's I3D-ResNet152 trunk
code at 1/16 width, a Longformer from a small ``LongformerConfig`` with a byte-level BPE tokenizer under
RoBERTa's rules) on 2 gloo processes, with validation, checkpoints and an exact resume; work shared across
ranks, and a collective timeout that a slow rank runs into."""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from benchmarks.merlin_stub import SMALL_LONGFORMER, write_longformer_stub

pytestmark = pytest.mark.merlin_scale  # make test-merlin-scale (CI runs it beside make test)

MINI = [
    "image.arch=i3_resnet152_mini",
    "image.embed_dim=32",
    "preprocess.spacing=[6.0,6.0,6.0]",
    "preprocess.spatial_size=[32,32,16]",
    "text.max_length=128",
    "train.batch_size=2",
    "train.steps=4",
    "train.eval_every=2",
    "train.eval_studies=8",
    "train.log_every=1",
    "train.num_workers=1",  # the DataLoader path, one loader process per rank
    "train.sync_batchnorm=false",  # SyncBatchNorm needs CUDA; the preset's true is refused on CPUs
    "optim.warmup_steps=1",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def longformer(tmp_path_factory):
    return write_longformer_stub(tmp_path_factory.mktemp("longformer"), **SMALL_LONGFORMER)


def _torchrun(data, out, cache, longformer, *extra):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
        "-m", "training.cli", "train", "--data", str(data), "--out", str(out), "--cache", str(cache), "--quiet",
        "--preset", "merlin", f"text.model={longformer}", *MINI, *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def _weights(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_miniature_merlin_trains_under_torchrun_and_resumes_exactly(corpus200, longformer, tmp_path):
    """Before, the second step failed: DDP waited for gradients of parameters no step uses (the
    Longformer's pooler and global-attention projections)."""
    cache = tmp_path / "cache"
    a = _torchrun(corpus200, tmp_path / "a", cache, longformer)
    assert a.returncode == 0, a.stderr[-3000:]
    assert a.stdout.count('"finished": true') == 1  # rank 0 speaks for the run
    assert '"world_size": 2' in a.stdout
    log = (tmp_path / "a" / "log.csv").read_text().splitlines()
    assert len(log) == 5 and {r.split(",")[2] for r in log[1:]} >= {"full"}  # both batch kinds ran
    assert (tmp_path / "a" / "val.csv").read_text().count("\n") == 3  # validation at steps 2 and 4
    for name in ("init", "last", "best"):
        assert (tmp_path / "a" / "checkpoints" / f"{name}.pt").exists()

    b1 = _torchrun(corpus200, tmp_path / "b", cache, longformer, "--stop-after", "2")
    assert b1.returncode == 0, b1.stderr[-3000:]
    assert '"finished": false' in b1.stdout
    b2 = _torchrun(corpus200, tmp_path / "b", cache, longformer)
    assert b2.returncode == 0, b2.stderr[-3000:]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and any("query_global" in k for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (tmp_path / "a" / "val.csv").read_text() == (tmp_path / "b" / "val.csv").read_text()


def test_sync_batchnorm_on_cpu_processes_is_refused(corpus200, longformer, tmp_path):
    r = _torchrun(corpus200, tmp_path / "r", tmp_path / "cache", longformer, "train.sync_batchnorm=true")
    assert r.returncode != 0 and "train.sync_batchnorm needs CUDA devices" in r.stderr


# -- a slow rank ---------------------------------------------------------------------------------------------
def _rank(rank, port, data, out, cache, timeout_s, slow_s, where, seen):
    """One rank of a 2-process run of the small CPU preset; rank 0 is ``slow_s`` late at ``where``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    from tests.conftest import TINY_TRAIN
    from training import train as train_module
    from training.config import TrainConfig

    real = getattr(train_module, where)

    def late(*args, **kwargs):
        if rank == 0:
            time.sleep(slow_s)
        out_ = real(*args, **kwargs)
        if where == "embed_images":
            seen[rank] = seen.get(rank, 0) + len(args[1])  # the validation studies this rank embedded
        return out_

    setattr(train_module, where, late)
    cfg = TrainConfig.load("cpu-tiny", [*TINY_TRAIN, "train.batch_size=4", f"train.dist_timeout_s={timeout_s}"])
    try:
        train_module.train(data, out, cfg, cache_dir=cache, progress=False)
    finally:
        torch.distributed.destroy_process_group()


def test_a_slow_rank_zero_is_waited_for_up_to_the_configured_timeout(corpus200, tmp_path):
    """Validation is sharded (each rank embeds half the studies), so no rank waits while rank 0 validates
    alone; a rank that is late by less than ``train.dist_timeout_s`` is waited for, and one late by more
    ends the job with the timeout's error instead of hanging on (or ending at a backend's default)."""
    seen = mp.Manager().dict()
    args = (corpus200, tmp_path / "ok", tmp_path / "cache", 120, 3.0, "embed_images", seen)
    mp.spawn(_rank, args=(_port(), *args), nprocs=2, join=True)
    assert (tmp_path / "ok" / "train_summary.json").exists()
    assert dict(seen) == {0: 16, 1: 16}  # 2 validations x 8 of the 16 evaluation studies each
    assert (tmp_path / "ok" / "val.csv").read_text().count("\n") == 3

    late = (corpus200, tmp_path / "late", tmp_path / "cache", 2, 8.0, "build_cache", mp.Manager().dict())
    with pytest.raises(mp.ProcessRaisedException, match="(?i)timed? ?out"):
        mp.spawn(_rank, args=(_port(), *late), nprocs=2, join=True)


# -- fine-tuning from Merlin's checkpoint -----------------------------------------------------------------------
def test_fine_tuning_starts_from_merlins_checkpoint_and_trains(corpus200, tmp_path):
    """image.init=merlin:FILE.pt on a random-weight checkpoint with every name and shape of Merlin's
    (I3D-ResNet152 at full width, Clinical-Longformer's configuration), built by the converter's model
    builder with PyTorch's initialisation: the run starts from exactly those tensors (its init checkpoint
    is the converted model), and its steps change both towers' weights with a finite loss. Whether the
    loss falls is not asked: at random initialisation both towers give nearly the same embedding for every
    input (the loss sits at ln N), and a few CPU steps move it by less than batch norm's running statistics
    do (1.79180 -> 1.79199 over 6 steps, up as often as down). Small inputs keep it to CPU minutes."""
    import numpy as np

    from training.cache import CachedVolumes, volume_cache
    from training.config import TrainConfig
    from training.convert_merlin import build_merlin_model
    from training.data import load_studies
    from training.loss import clip_loss
    from training.run_folder import load_run
    from training.sampling import BatchPlanner
    from training.train import train

    # Clinical-Longformer's configuration (no weights) with a 32-token attention window: the window is no
    # tensor's shape, and the published 512 pads every text to 512 tokens, minutes of CPU per step
    text = write_longformer_stub(tmp_path / "clinical-longformer", attention_window=32)
    ckpt = tmp_path / "merlin.pt"
    sd = build_merlin_model(text).state_dict()
    assert len(sd) >= 1208  # Merlin's tensors (and the position-id buffers some versions save)
    torch.save(sd, ckpt)
    over = [
        f"text.model={text}", f"image.init=merlin:{ckpt}", "preprocess.spacing=[6.0,6.0,6.0]",
        "preprocess.spatial_size=[32,32,16]", "text.max_length=128", "train.batch_size=4", "train.steps=6",
        "train.eval_every=6", "train.eval_studies=4", "train.sync_batchnorm=false", "train.grad_checkpointing=false",
        "train.num_workers=0", "batching.schedule=full", "sampler.subset_fraction=0.05", "sampler.order=passes",
        "optim.warmup_steps=1", "optim.lr=3e-4", "optim.text_lr=3e-5",
    ]  # fmt: skip
    cfg = TrainConfig.load("merlin", over)
    train(corpus200, tmp_path / "run", cfg, cache_dir=tmp_path / "cache", progress=False)

    init, _ = load_run(tmp_path / "run", "init")
    got = init.state_dict()
    for k, v in sd.items():
        if not k.startswith("encode_image.i3_resnet.classifier."):
            assert torch.equal(got[k], v), k  # the converted model, tensor for tensor

    planner = BatchPlanner([s for s in load_studies(corpus200) if s.split == "train"], cfg, 1)
    items = list({it.index: it for step in range(6) for it in planner.global_items(step)}.values())
    vols = CachedVolumes(volume_cache(cfg.spec, tmp_path / "cache"), planner.studies)
    images = torch.from_numpy(np.stack([vols[it.index] for it in items]))
    texts = [planner.text_of(it) for it in items]  # the studies it trained on, as it saw them

    def loss(model):
        with torch.no_grad():
            return clip_loss(*model(images, texts=texts)).item()

    last, _ = load_run(tmp_path / "run", "last")
    trained = last.state_dict()
    for tower in ("encode_image.", "encode_text."):
        moved = [k for k, v in sd.items() if k.startswith(tower) and v.is_floating_point() and k in trained]
        assert any(not torch.equal(trained[k], sd[k]) for k in moved), tower  # the steps changed the tower
    assert np.isfinite(loss(init)) and np.isfinite(loss(last))

    # Before training, the run's package is the converted model: the init checkpoint exported gives the
    # prompt table and the image embeddings of Merlin's model as the converter loads it (and the preset's
    # preprocessing is Merlin's, the converter's spec, where this test shrinks it for the CPU).
    from operators.contract.package import load_package
    from operators.contract.preprocessing import PreprocessSpec
    from operators.contract.prompts import prompt_table
    from operators.contract.scoring import ZeroShotModel
    from training.convert_merlin import load_merlin_state, read_checkpoint
    from training.export import embed_prompts, export_run

    assert TrainConfig.load("merlin", [f"text.model={text}"]).spec == PreprocessSpec.merlin()
    export_run(tmp_path / "run", tmp_path / "pkg", corpus200, checkpoint="init", text="none", parity_studies=2,
               cache_dir=tmp_path / "cache", progress=False, log=lambda _: None)  # fmt: skip
    pkg = load_package(tmp_path / "pkg")
    converted = build_merlin_model(text)
    load_merlin_state(converted, read_checkpoint(ckpt), str(ckpt))
    converted.eval()
    np.testing.assert_allclose(pkg.prompt_embeddings, embed_prompts(converted, prompt_table(pkg.catalogue)[0]),
                               atol=1e-5)  # fmt: skip
    with torch.no_grad():
        want = converted.image_embeddings(images[:2]).numpy()
    np.testing.assert_allclose(ZeroShotModel(pkg, device="cpu").embed_images(images[:2].numpy()), want, atol=1e-4)
    assert pkg.logit_scale == pytest.approx(converted.scale().item(), rel=1e-6)

    bad = tmp_path / "other.pt"
    torch.save({**sd, "encode_text.linear_layer.weight": torch.zeros(256, 768)}, bad)
    other = TrainConfig.load("merlin", [o.replace(str(ckpt), str(bad)) for o in over])
    with pytest.raises(ValueError, match="linear_layer.weight \\(256, 768\\) vs \\(512, 768\\)"):
        train(corpus200, tmp_path / "bad", other, cache_dir=tmp_path / "cache", progress=False)
