"""The IGReg multi-task network: encoder -> multi-scale neck -> classification branch and
segmentation decoder.

The parts are separate submodules so that the training strategies can run them on different rows
of a batch (the classification branch on labelled rows, the decoder on segmentation rows) and copy
the classification path (neck + classification branch) into the STDGP surrogates.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scripts.networks.blocks import AdaptiveScaleAttention, AttentionGate, BiVA, ConvNormAct, MultiConvFusion, resize_to
from scripts.networks.encoder import SEResNeXtEncoder3d

# number of stride-2 steps from the stride-4 fused map to each level (strides 4, 8, 16, 16)
_LEVEL_DOWNSAMPLING = (0, 1, 2, 2)


class MultiScaleNeck(nn.Module):
    """BiVA over the four stages, fusion of the four levels at stride 4 (`fuse0`), and one ASA block
    per level. Returns the four attended levels and `fuse0`."""

    def __init__(self, in_widths: Sequence[int], channels: int) -> None:
        super().__init__()
        self.biva = BiVA(in_widths, channels)
        self.fusion = MultiConvFusion(channels, 4)
        self.asa = nn.ModuleList([AdaptiveScaleAttention(channels, n) for n in _LEVEL_DOWNSAMPLING])

    def forward(self, feats: List[Tensor]) -> Tuple[List[Tensor], Tensor]:
        v = self.biva(feats)
        fused = self.fusion(torch.cat((resize_to(v[3], v[0]), resize_to(v[2], v[0]), resize_to(v[1], v[0]), v[0]), 1))
        scales: List[Tensor] = []
        for i, asa in enumerate(self.asa):
            scales.append(asa(v[i], fused))
        return scales, fused


class ClassificationBranch(nn.Module):
    """Attention-gated downsampling of the levels to stride 16, global pooling to the feature `F_t`
    (2 x channels), and one linear head per task.

    ``pooling`` "avg" is the reference's global average; "max" takes each channel's strongest
    response, so that a small lesion's features are not diluted by the rest of the brain.
    """

    def __init__(self, channels: int, num_classes: Sequence[int], pooling: str = "avg") -> None:
        super().__init__()
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
        self.max_pool = pooling == "max"
        self.down8 = ConvNormAct(channels, channels, 3, stride=2, down=True)
        self.gate8 = AttentionGate(2 * channels, channels)
        self.down16 = ConvNormAct(channels, channels, 3, stride=2, down=True)
        self.gate16 = AttentionGate(2 * channels, channels)
        self.heads = nn.ModuleList([nn.Linear(2 * channels, k) for k in num_classes])
        self.spatial = nn.Identity()  # the last spatial map [B, 2 x channels, *S/16] before pooling (saliency's hook)

    def features(self, scales: List[Tensor]) -> Tensor:
        """`F_t`: the pooled classification feature, [B, 2 x channels]."""
        x = resize_to(self.down8(scales[0]), scales[1])
        x = self.gate8(torch.cat((x, scales[1]), 1), scales[1])
        x = resize_to(self.down16(x), scales[2])
        x = self.gate16(torch.cat((x, scales[2]), 1), scales[2])
        x = self.spatial(torch.cat((x, resize_to(scales[3], x)), 1))
        return x.amax(dim=[2, 3, 4]) if self.max_pool else x.mean(dim=[2, 3, 4])

    def forward(self, scales: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        feature = self.features(scales)
        logits: List[Tensor] = []
        for head in self.heads:
            logits.append(head(feature))
        return feature, logits


class SegmentationDecoder(nn.Module):
    """Attention-gated upsampling stride 16 -> 8 -> 4 (`M_t`) -> 2 -> full size, with the main
    2-class head on the decoder and two deep-supervision heads on `fuse0` and `fuse1`.

    The 1x1x1 heads run before the final trilinear upsampling (they commute), so only 2-channel
    maps are brought to full resolution.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate8 = AttentionGate(3 * channels, channels)
        self.gate4 = AttentionGate(2 * channels, channels)
        self.up2 = ConvNormAct(channels, channels, 3)
        self.fusion = MultiConvFusion(channels, 4)
        self.head = nn.Conv3d(channels, 2, 1)
        self.head_fuse0 = nn.Conv3d(channels, 2, 1)
        self.head_fuse1 = nn.Conv3d(channels, 2, 1)

    def embed(self, scales: List[Tensor]) -> Tensor:
        """`M_t`: the decoder feature at stride 4 (channels wide)."""
        x = resize_to(torch.cat((scales[3], scales[2]), 1), scales[1])
        x = self.gate8(torch.cat((x, scales[1]), 1), scales[1])
        x = resize_to(x, scales[0])
        return self.gate4(torch.cat((x, scales[0]), 1), scales[0])

    def segment(self, embedding: Tensor, scales: List[Tensor], fused: Tensor, out_size: List[int],
                deep_supervision: bool = False) -> List[Tensor]:
        """Logits [B, 2, *out_size]: the main head first, then (deep supervision) the fuse0 and fuse1 heads."""
        x = self.up2(F.interpolate(embedding, scale_factor=2.0, mode="trilinear", align_corners=False))
        outputs = [F.interpolate(self.head(x), size=out_size, mode="trilinear", align_corners=False)]
        if deep_supervision:
            ref = scales[0]
            fused1 = self.fusion(torch.cat((resize_to(scales[3], ref), resize_to(scales[2], ref),
                                            resize_to(scales[1], ref), ref), 1))
            outputs.append(F.interpolate(self.head_fuse0(fused), size=out_size, mode="trilinear", align_corners=False))
            outputs.append(F.interpolate(self.head_fuse1(fused1), size=out_size, mode="trilinear", align_corners=False))
        return outputs


class IGRegNet(nn.Module):
    """Multi-task glioma network: per-task classification logits and a 2-class tumor segmentation.

    Args:
        in_channels: image channels (T1C, T2W).
        num_channels: width of the neck, the decoder and the classification branch (even).
        tasks: classification task names, in the order of the batch's label columns.
        num_classes: classes per task (one int for all tasks, or one per task).
        depths: bottleneck blocks of the four encoder stages.
        widths: output channels of the four encoder stages.
        cardinality: groups of the encoder's 3x3x3 convolutions.
        stem_channels: encoder stem width (default widths[0] // 2).
        se_reduction: squeeze-excitation reduction ratio.
        pooling: global pooling of the classification branch, "avg" (reference) or "max".

    `forward(image[B, C, *S])` (S divisible by 16) returns `{"seg": logits[B, 2, *S], task: logits[B, K]}`.
    """

    def __init__(self, in_channels: int = 2, num_channels: int = 24,
                 tasks: Sequence[str] = ("1p19q", "idh", "grade"), num_classes: Union[int, Sequence[int]] = 2,
                 depths: Sequence[int] = (3, 4, 6, 3), widths: Sequence[int] = (128, 256, 512, 512),
                 cardinality: int = 32, stem_channels: Union[int, None] = None, se_reduction: int = 16,
                 pooling: str = "avg") -> None:
        super().__init__()
        if num_channels % 2:
            raise ValueError("num_channels must be even (GroupNorm uses two channels a group)")
        if "seg" in tasks or len(set(tasks)) != len(tasks) or not tasks:
            raise ValueError(f"task names must be unique, non-empty and not 'seg': {tasks}")
        classes = [num_classes] * len(tasks) if isinstance(num_classes, int) else list(num_classes)
        if len(classes) != len(tasks):
            raise ValueError("num_classes needs one entry per task")
        self.tasks: List[str] = list(tasks)
        self.num_classes: List[int] = classes
        self.num_channels = num_channels
        self.encoder = SEResNeXtEncoder3d(in_channels, widths, depths, cardinality, stem_channels, se_reduction)
        self.neck = MultiScaleNeck(widths, num_channels)
        self.classifier = ClassificationBranch(num_channels, classes, pooling)
        self.decoder = SegmentationDecoder(num_channels)

    @property
    def feature_dim(self) -> int:
        """Length of the classification feature `F_t`."""
        return 2 * self.num_channels

    def forward(self, image: Tensor) -> Dict[str, Tensor]:
        scales, fused = self.neck(self.encoder(image))
        _, logits = self.classifier(scales)
        seg = self.decoder.segment(self.decoder.embed(scales), scales, fused, image.shape[2:])[0]
        out: Dict[str, Tensor] = {"seg": seg}
        for i, name in enumerate(self.tasks):
            out[name] = logits[i]
        return out
