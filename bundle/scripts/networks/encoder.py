"""3D SE-ResNeXt encoder: four stages with output strides 4, 8, 16 and 16 (the last one dilated)."""

from __future__ import annotations

from typing import List, Sequence

from torch import Tensor, nn


class SqueezeExcitation3d(nn.Module):
    """Channel re-weighting from globally pooled statistics (squeeze-and-excitation)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.LeakyReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        w = self.fc(x.mean(dim=[2, 3, 4]))
        return x * w[:, :, None, None, None]


class SEResNeXtBottleneck3d(nn.Module):
    """1x1x1 reduce -> grouped 3x3x3 (stride / dilation) -> 1x1x1 expand -> SE, plus a shortcut.

    The inner width is half of `out_channels` (expansion 2) and must be divisible by `cardinality`.
    As in the reference, one PReLU (one learnable slope) serves the block's three activations; it
    appears in the state dict under all three names (body.2, body.5, act).
    """

    def __init__(self, in_channels: int, out_channels: int, cardinality: int, stride: int = 1,
                 dilation: int = 1, se_reduction: int = 16) -> None:
        super().__init__()
        mid = out_channels // 2
        if mid % cardinality:
            raise ValueError(f"inner width {mid} (= out_channels / 2) is not divisible by cardinality {cardinality}")
        act = nn.PReLU()
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, mid, 1, bias=False), nn.BatchNorm3d(mid), act,
            nn.Conv3d(mid, mid, 3, stride=stride, padding=dilation, dilation=dilation, groups=cardinality,
                      bias=False),
            nn.BatchNorm3d(mid), act,
            nn.Conv3d(mid, out_channels, 1, bias=False), nn.BatchNorm3d(out_channels),
            SqueezeExcitation3d(out_channels, se_reduction))
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm3d(out_channels))
        else:
            self.shortcut = nn.Identity()
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class SEResNeXtEncoder3d(nn.Module):
    """Stem (7x7x7 conv stride 2, 3x3x3 max-pool stride 2) and four bottleneck stages.

    Args:
        in_channels: image channels.
        widths: output channels of the four stages.
        depths: bottleneck blocks per stage.
        cardinality: groups of the 3x3x3 convolutions.
        stem_channels: stem width (default: half of the first stage width, as SE-ResNeXt-50 with 128).
        se_reduction: squeeze-excitation reduction ratio.

    `forward` returns the four stage outputs at strides 4, 8, 16 and 16 (the last stage keeps the
    resolution and dilates its 3x3x3 convolutions by 2).
    """

    def __init__(self, in_channels: int = 2, widths: Sequence[int] = (128, 256, 512, 512),
                 depths: Sequence[int] = (3, 4, 6, 3), cardinality: int = 32, stem_channels: int | None = None,
                 se_reduction: int = 16) -> None:
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError("widths and depths need four entries, one per stage")
        stem = stem_channels or max(1, widths[0] // 2)
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, stem, 7, stride=2, padding=3, bias=False), nn.BatchNorm3d(stem), nn.PReLU(),
            nn.MaxPool3d(3, stride=2, padding=1))
        strides, dilations = (1, 2, 2, 1), (1, 1, 1, 2)
        stages, previous = [], stem
        for width, depth, stride, dilation in zip(widths, depths, strides, dilations):
            blocks = [SEResNeXtBottleneck3d(previous if i == 0 else width, width, cardinality,
                                            stride if i == 0 else 1, dilation, se_reduction) for i in range(depth)]
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.widths = list(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.stem(x)
        outputs: List[Tensor] = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs
