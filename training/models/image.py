"""3D image encoders built on MONAI's ResNet.

``I3ResNet`` is MONAI's 3D ResNet trunk plus Merlin's two 1x1x1 Conv3d heads on the pooled
features (``contrastive_head`` to the joint space, optional ``classifier``), so its state dict
uses Merlin's names (``conv1``, ``bn1``, ``layer1..4``, ``contrastive_head``, ``classifier``) and
the official image tower loads strictly under ``encode_image.i3_resnet``. The input is
``(B, 1, X, Y, Z)`` in RAS order; Merlin permutes it to depth-first ``(B, 1, Z, X, Y)`` and repeats
the channel to 3 (the inflated ImageNet stem expects RGB), which ``ImageEncoder`` does too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import STEM_POOLS


@dataclass(frozen=True)
class ImageArch:
    block: str  # "bottleneck" | "basic"
    layers: tuple[int, int, int, int]
    inplanes: tuple[int, int, int, int]
    in_channels: int  # 3 for Merlin's inflated ImageNet stem
    stem_kernel: tuple[int, int, int]
    stem_stride: tuple[int, int, int]
    no_max_pool: bool = False
    # 1: the last stage keeps its input's resolution (no stride-2 downsampling), so the last feature map, the
    # localisation maps' source, has twice the locations on every axis
    last_stride: int = 2

    @property
    def feature_dim(self) -> int:
        return self.inplanes[3] * (4 if self.block == "bottleneck" else 1)


ARCHS = {
    # Merlin: I3D ResNet-152, stem (3,7,7) stride (1,2,2); 2048-d features.
    "i3_resnet152": ImageArch("bottleneck", (3, 8, 36, 3), (64, 128, 256, 512), 3, (3, 7, 7), (1, 2, 2)),
    # Merlin's trunk code path (the same blocks, stem and strides) at 1/16 of its width, for testing the
    # `merlin` preset's path on a CPU in seconds (tests/training/test_merlin_scale.py)
    "i3_resnet152_mini": ImageArch("bottleneck", (3, 8, 36, 3), (4, 8, 16, 32), 3, (3, 7, 7), (1, 2, 2)),
    "i3_resnet50": ImageArch("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 3, (3, 7, 7), (1, 2, 2)),
    # CPU-scale variants for the tiny profile (64x56x56 inputs at ~5 mm). Downsampling early
    # (stride-2 stem and max-pool) is what makes them fast: a stride-1 stem at full resolution
    # cost 25 s per batch of 32 on 2 cores; resnet10_tiny costs 0.45 s (forward + backward).
    "resnet10_tiny": ImageArch("basic", (1, 1, 1, 1), (16, 32, 64, 128), 1, (3, 3, 3), (2, 2, 2)),
    "resnet10_wide": ImageArch("basic", (1, 1, 1, 1), (24, 48, 96, 192), 1, (5, 5, 5), (2, 2, 2)),
    "resnet18_small": ImageArch("basic", (2, 2, 2, 2), (32, 64, 128, 256), 1, (3, 5, 5), (2, 2, 2)),
    # resnet10_wide whose last stage keeps stride 1: a 4 x 4 x 4 last feature map at 64 x 56 x 56, not 2 x 2 x 2
    "resnet10_wide_s1": ImageArch("basic", (1, 1, 1, 1), (24, 48, 96, 192), 1, (5, 5, 5), (2, 2, 2), last_stride=1),
}


class I3ResNet(ResNet):
    """MONAI ResNet trunk + Merlin's heads; ``forward`` returns the (unnormalised) projection."""

    def __init__(
        self,
        arch: ImageArch,
        embed_dim: int,
        n_classes: int = 0,
        map_shape: tuple[int, ...] | None = None,
        pool: str = "avg",
        stem_pool: str = "max",
    ):
        super().__init__(
            block=ResNetBottleneck if arch.block == "bottleneck" else ResNetBlock,
            layers=list(arch.layers),
            block_inplanes=list(arch.inplanes),
            spatial_dims=3,
            n_input_channels=arch.in_channels,
            conv1_t_size=arch.stem_kernel,
            conv1_t_stride=arch.stem_stride,
            no_max_pool=arch.no_max_pool,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,
        )
        if arch.last_stride == 1:  # MONAI builds layer4 with stride 2 in its first block's conv and shortcut
            first = self.layer4[0]
            first.conv1.stride = (1, 1, 1)
            if first.downsample is not None:
                first.downsample[0].stride = (1, 1, 1)
        # pool "avg": Merlin's global average pooling and 1x1x1 heads. "flatten": the heads are
        # convolutions as large as the last feature map (``map_shape``, (Z, X, Y)), i.e. linear maps of
        # the flattened features, so where a feature fires counts. "both": the average's head plus a
        # ``position_head`` over the whole map, summed.
        kernel = tuple(map_shape) if pool == "flatten" and map_shape else 1
        if pool == "flatten":
            self.avgpool = nn.Identity()  # type: ignore[assignment]
        self.contrastive_head = nn.Conv3d(arch.feature_dim, embed_dim, kernel_size=kernel)
        self.classifier = nn.Conv3d(arch.feature_dim, n_classes, kernel_size=kernel) if n_classes else None
        self.position_head = (
            nn.Conv3d(arch.feature_dim, embed_dim, kernel_size=tuple(map_shape), bias=False)
            if pool == "both" and map_shape
            else None
        )
        self.gradient_checkpointing = False
        self.stem_pool = stem_pool

    def _layers(self) -> tuple[nn.Module, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        if self.no_max_pool:
            return x
        if self.stem_pool == "maxmin":  # after the ReLU a darker spot is a dip: keep the window's minimum too
            h = x.shape[1] // 2
            return torch.cat([self.maxpool(x[:, :h]), -self.maxpool(-x[:, h:])], dim=1)
        return self.maxpool(x)

    def stages(self) -> list[list[nn.Module]]:
        """The trunk in order: the stem (conv1, bn1, max-pool), then layer1..4."""
        return [[self.conv1, self.bn1, self.maxpool], *([layer] for layer in self._layers())]

    def trunk(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        """The first ``upto`` stages (0: the input itself)."""
        if upto >= 1:
            x = self._stem(x)
        for layer in self._layers()[: max(0, upto - 1)]:
            x = layer(x)
        return x

    def features(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Trunk features from the input (``start=0``) or from the output of the first ``start`` stages."""
        if start == 0:
            x = self._stem(x)
        for layer in self._layers()[max(0, start - 1) :]:
            if self.gradient_checkpointing and self.training and x.requires_grad:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x if self.position_head is not None else self.avgpool(x)  # (B, F, 1, 1, 1) unless "both"

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        f = self.features(x, start)
        if self.position_head is not None:
            return (self.contrastive_head(self.avgpool(f)) + self.position_head(f)).flatten(1)
        return self.contrastive_head(f).flatten(1)


def _map_shape(arch: ImageArch, input_size: tuple[int, int, int]) -> tuple[int, ...]:
    """The trunk's last feature map (Z, X, Y) for an (X, Y, Z) input, from a forward pass of zeros."""
    x, y, z = input_size
    with torch.no_grad(), torch.random.fork_rng():  # the tower's initialisation stays the seed's
        trunk = I3ResNet(arch, 1).eval()
        out = trunk.trunk(torch.zeros(1, arch.in_channels, z, x, y), 5)
    return tuple(int(n) for n in out.shape[2:])


class ImageEncoder(nn.Module):
    """(B, 1, X, Y, Z) in [0, 1] -> (B, D) joint-space embedding (not normalised).

    ``frozen_stages`` k > 0 locks the stem (k = 1) and layer1.. (k > 1) at their initial weights, batch
    norm included (always in eval mode), as a locked text tower: their output for a volume never changes,
    so training computes it once per volume (``trunk``) and each step runs only the rest
    (``forward(trunk_out, from_trunk=True)``); ``forward(image)`` is the whole tower, the same numbers."""

    def __init__(
        self,
        arch_name: str,
        embed_dim: int,
        n_classes: int = 0,
        frozen_stages: int = 0,
        pool: str = "avg",
        input_size: tuple[int, int, int] | None = None,
        stem_pool: str = "max",
    ):
        super().__init__()
        if arch_name not in ARCHS:
            raise ValueError(f"unknown image architecture {arch_name!r}; choose from {sorted(ARCHS)}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"image.frozen_stages must be 0..4 (stem, layer1..3), got {frozen_stages}")
        if pool not in ("avg", "flatten", "both"):
            raise ValueError(f"image.pool must be 'avg', 'flatten' or 'both', got {pool!r}")
        if pool != "avg" and input_size is None:
            raise ValueError(f"image.pool={pool} needs the input size (preprocess.spatial_size)")
        if stem_pool not in STEM_POOLS:
            raise ValueError(f"image.stem_pool must be one of {STEM_POOLS}, got {stem_pool!r}")
        self.arch = ARCHS[arch_name]
        map_shape = _map_shape(self.arch, input_size) if pool != "avg" and input_size else None
        self.i3_resnet = I3ResNet(self.arch, embed_dim, n_classes, map_shape, pool, stem_pool)
        self.frozen_stages = frozen_stages
        for stage in self.i3_resnet.stages()[:frozen_stages]:
            for m in stage:
                for p in m.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        for stage in self.i3_resnet.stages()[: self.frozen_stages]:
            for m in stage:
                m.eval()
        return self

    def _input(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 1, 4, 2, 3)  # (B, 1, Z, X, Y): depth first, as Merlin
        if self.arch.in_channels != 1:
            x = x.expand(-1, self.arch.in_channels, -1, -1, -1)
        return x

    @torch.no_grad()
    def trunk(self, image: torch.Tensor) -> torch.Tensor:
        """The frozen stages' output for a batch of volumes."""
        return self.i3_resnet.trunk(self._input(image), self.frozen_stages)

    def forward(self, image: torch.Tensor, from_trunk: bool = False) -> torch.Tensor:
        if from_trunk:
            return self.i3_resnet(image, self.frozen_stages)
        return self.i3_resnet(self._input(image))
