"""Building blocks of the MA-MTLN-style multi-scale head: BiVA, ASA, attention gates and fusions.

All blocks use GroupNorm (per sample, a few channels a group), so every sample is processed
independently of the others in its batch; the IGReg surrogates rely on that to run each task's rows
on their own.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, groups: int | None = None) -> nn.GroupNorm:
    """GroupNorm with `groups` groups, or two channels a group when `groups` is None or does not divide."""
    if groups is None or channels % groups:
        groups = max(1, channels // 2)
    return nn.GroupNorm(groups, channels)


# the reference's strided down-sampling and scale-weight embeddings normalise with 8 groups and no conv bias
DOWN_GROUPS = 8


class ConvNormAct(nn.Sequential):
    """Conv3d (same padding, with bias unless `bias` is False) -> GroupNorm -> PReLU.

    The bias matters: with a few channels a group, GroupNorm does not cancel a per-channel bias.
    `down` selects the reference's other variant (no bias, `DOWN_GROUPS` groups), used by its
    strided down-sampling convolutions and the ASA scale-weight embeddings.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 down: bool = False) -> None:
        super().__init__(nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride,
                                   padding=kernel_size // 2, bias=not down),
                         group_norm(out_channels, DOWN_GROUPS if down else None), nn.PReLU())


def resize_to(x: Tensor, ref: Tensor) -> Tensor:
    """Trilinear resize of `x` to the spatial size of `ref` (no-op when they already match)."""
    size = ref.shape[2:]
    if x.shape[2:] == size:
        return x
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class WeightedSum(nn.Module):
    """Fast normalised fusion: sum_i w_i x_i with w = prelu(a) / (sum prelu(a) + eps), `a` learnable
    (the reference rectifies the weights with a PReLU of learnable slope, not a ReLU)."""

    def __init__(self, n_inputs: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_inputs))
        self.act = nn.PReLU()
        self.eps = eps

    def forward(self, xs: List[Tensor]) -> Tensor:
        w = self.act(self.weight)
        w = w / (w.sum() + self.eps)
        out = xs[0] * w[0]
        for i in range(1, len(xs)):
            out = out + xs[i] * w[i]
        return out


# dilation of the last convolution of each visual-attention branch, widest receptive field last
_VA_DILATIONS: Tuple[Tuple[int, int, int], ...] = ((1, 1, 1), (3, 3, 3), (5, 5, 5), (5, 7, 7))


class VisualAttentionBlock(nn.Module):
    """Parallel gating branches of growing receptive field; each branch gates the input, the gated
    maps are fused by a 1x1x1 convolution and added back to the input.

    Branch i is a chain of i+1 plain convolutions (the first one 1x1x1 for branch 0) followed by a
    3x3x3 convolution with the i-th dilation of (1, 3, 5, (5, 7, 7)) and a sigmoid.
    """

    def __init__(self, channels: int, n_branches: int) -> None:
        super().__init__()
        branches = []
        for i in range(n_branches):
            layers: List[nn.Module] = [nn.Conv3d(channels, channels, 1 if i == 0 else 3, padding=0 if i == 0 else 1)]
            layers += [nn.Conv3d(channels, channels, 3, padding=1) for _ in range(i - 1)]
            d = _VA_DILATIONS[i]
            layers += [nn.Conv3d(channels, channels, 3, padding=d, dilation=d), nn.Sigmoid()]
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)
        self.fuse = nn.Conv3d(channels * n_branches, channels, 1)
        self.act = nn.PReLU()

    def forward(self, x: Tensor) -> Tensor:
        gated: List[Tensor] = []
        for branch in self.branches:
            gated.append(branch(x) * x)
        return self.act(self.fuse(torch.cat(gated, 1)) + x)


class BiVA(nn.Module):
    """Bidirectional visual-attention pyramid over the four encoder stages.

    Each stage is reduced to `channels`; a top-down pass (deepest first) runs a visual-attention
    block per level on a weighted mix of the level and the refined level above it; a bottom-up pass
    mixes each level with its top-down output and the (strided) bottom-up output below it.
    Levels of the deepest branch get fewer attention branches (4, 3, 2, 2 from shallow to deep).
    """

    def __init__(self, in_widths: Sequence[int], channels: int) -> None:
        super().__init__()
        self.reduce = nn.ModuleList([ConvNormAct(w, channels, 1) for w in in_widths])
        self.attend = nn.ModuleList([VisualAttentionBlock(channels, n) for n in (4, 3, 2, 2)])
        self.down = nn.ModuleList([ConvNormAct(channels, channels, 1, stride=2, down=True) for _ in range(2)])
        self.mix_down = nn.ModuleList([WeightedSum(2) for _ in range(3)])     # levels 3, 2, 1
        self.mix_up = nn.ModuleList([WeightedSum(2)] + [WeightedSum(3) for _ in range(3)])  # levels 1..4

    def forward(self, feats: List[Tensor]) -> List[Tensor]:
        x: List[Tensor] = []
        for i, reduce in enumerate(self.reduce):
            x.append(reduce(feats[i]))
        a = self.attend
        m = self.mix_down
        t4 = a[3](x[3])
        t3 = a[2](F.silu(m[0]([x[2], resize_to(t4, x[2])])))
        t2 = a[1](F.silu(m[1]([x[1], resize_to(t3, x[1])])))
        t1 = a[0](F.silu(m[2]([x[0], resize_to(t2, x[0])])))
        u = self.mix_up
        o1 = F.silu(u[0]([x[0], t1]))
        o2 = F.silu(u[1]([x[1], t2, resize_to(self.down[0](o1), x[1])]))
        o3 = F.silu(u[2]([x[2], t3, resize_to(self.down[1](o2), x[2])]))
        o4 = F.silu(u[3]([x[3], t4, resize_to(o3, x[3])]))
        return [o1, o2, o3, o4]


class MultiConvFusion(nn.Sequential):
    """Concatenated maps -> 1x1x1 to `channels` -> two 3x3x3 convolutions."""

    def __init__(self, channels: int, n_inputs: int) -> None:
        super().__init__(ConvNormAct(channels * n_inputs, channels, 1), ConvNormAct(channels, channels, 3),
                         ConvNormAct(channels, channels, 3))


class AdaptiveScaleAttention(nn.Module):
    """ASA: re-weights one pyramid level against the fused map brought to its resolution.

    The fused map is downsampled by `n_down` applications of one strided convolution; per-voxel
    softmax weights over (level, fused) scale two self-attended copies, whose sum gates the fused
    map; the level and the gated map are refined together.
    """

    def __init__(self, channels: int, n_down: int, compress: int = 16) -> None:
        super().__init__()
        self.n_down = n_down
        self.down = ConvNormAct(channels, channels, 3, stride=2, down=True)
        self.attention = nn.Sequential(ConvNormAct(channels, channels, 1), ConvNormAct(channels, channels, 3),
                                       nn.Conv3d(channels, channels, 3, padding=1), nn.Sigmoid())
        self.embed_level = ConvNormAct(channels, compress, 1, down=True)
        self.embed_fused = ConvNormAct(channels, compress, 1, down=True)
        self.scale_logits = nn.Conv3d(2 * compress, 2, 1)
        self.refine = MultiConvFusion(channels, 2)

    def forward(self, level: Tensor, fused: Tensor) -> Tensor:
        f = fused
        for _ in range(self.n_down):
            f = self.down(f)
        f = resize_to(f, level)
        w = torch.softmax(self.scale_logits(torch.cat((self.embed_level(level), self.embed_fused(f)), 1)), 1)
        mixed = self.attention(level) * level * w[:, :1] + self.attention(f) * f * w[:, 1:]
        return self.refine(torch.cat((level, mixed * f), 1))


class AttentionGate(nn.Module):
    """`conv(sigmoid_gate(context) * x)`: a context map (concatenated scales) gates `x`."""

    def __init__(self, context_channels: int, channels: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(ConvNormAct(context_channels, channels, 1), nn.Conv3d(channels, channels, 1),
                                  nn.Sigmoid())
        self.conv = ConvNormAct(channels, channels, 3)

    def forward(self, context: Tensor, x: Tensor) -> Tensor:
        return self.conv(self.gate(context) * x)
