"""MONAI transforms that bring a glioma case from NIfTI files to the tensors of one batch row.

The bundle configs spell the same chains out in YAML; :func:`preprocessing` and
:func:`augmentation` build them in Python (tests, scripts) with the same defaults.
Output keys: ``image`` [2, *S] (T1C, T2W; z-scored), ``seg`` [1, *S] binary, ``has_seg`` (bool),
``label`` [T] int64 with -1 for a missing label, ``case_id``.
"""
from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    ConcatItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResampleToMatchd,
    ResizeWithPadOrCropd,
    SelectItemsd,
    Spacingd,
    Transform,
)

from .datalist import TASKS

MISSING = -1  # label value of "no label for this task"


class BinarizeMaskd(MapTransform):
    """Turn a label map into a float32 binary mask: every value above ``threshold`` is tumor."""

    def __init__(self, keys: KeysCollection, threshold: float = 0.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (d[key] > self.threshold).to(torch.float32)
        return d


class EnsureMaskd(Transform):
    """Give every case a ``seg`` entry: its mask, or zeros shaped like one channel of ``image``;
    ``has_seg`` tells which."""

    def __init__(self, key: str = "seg", ref_key: str = "image", flag_key: str = "has_seg"):
        self.key, self.ref_key, self.flag_key = key, ref_key, flag_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        d[self.flag_key] = torch.tensor(self.key in d)
        if self.key not in d:
            ref = d[self.ref_key]
            zeros = torch.zeros((1, *ref.shape[1:]), dtype=torch.float32)
            d[self.key] = MetaTensor(zeros, meta=dict(ref.meta)) if isinstance(ref, MetaTensor) else zeros
        return d


class TaskLabelsd(Transform):
    """Gather the task labels of a case into one int64 vector ``label`` [T] (``-1`` where missing)."""

    def __init__(self, tasks: Sequence[str] = TASKS, key: str = "label"):
        self.tasks, self.key = list(tasks), key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        d[self.key] = torch.tensor([int(d.pop(t, MISSING)) for t in self.tasks], dtype=torch.int64)
        return d


def preprocessing(pixdim: float | Sequence[float] = 1.0, spatial_size: Sequence[int] = (160, 192, 160),
                  tasks: Sequence[str] | None = TASKS) -> Compose:
    """Deterministic chain shared by training, validation and (``tasks=None``: no labels/mask) inference.

    Load T1C/T2W (and the mask), channel first, binarise the mask, resample T2W and the mask onto
    the T1C grid, stack the channels, RAS, ``pixdim`` spacing, crop to the T1C brain, pad/crop to
    ``spatial_size``, z-score the nonzero voxels per channel.
    """
    image_keys, spatial_keys = ["t1c", "t2w", "seg"], ["image", "seg"]
    chain = [
        LoadImaged(image_keys, image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(image_keys, allow_missing_keys=True),
        BinarizeMaskd("seg", allow_missing_keys=True),
        ResampleToMatchd(["t2w", "seg"], key_dst="t1c", mode=["bilinear", "nearest"], padding_mode="zeros",
                         allow_missing_keys=True),
        ConcatItemsd(["t1c", "t2w"], name="image"),
        DeleteItemsd(["t1c", "t2w"]),
        Orientationd(spatial_keys, axcodes="RAS", labels=None, allow_missing_keys=True),
        Spacingd(spatial_keys, pixdim=pixdim, mode=["bilinear", "nearest"], allow_missing_keys=True),
        CropForegroundd(spatial_keys, source_key="image", channel_indices=0, start_coord_key=None,
                        end_coord_key=None, allow_missing_keys=True),
        ResizeWithPadOrCropd(spatial_keys, spatial_size=spatial_size, allow_missing_keys=True),
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
    ]
    if tasks is None:
        return Compose([*chain, SelectItemsd(["image", "case_id"], allow_missing_keys=True)])
    return Compose([*chain, EnsureMaskd(), TaskLabelsd(tasks),
                    SelectItemsd(["image", "seg", "has_seg", "label", "case_id"], allow_missing_keys=True)])


def augmentation(flip_axes: Sequence[int] = (0,), flip_prob: float = 0.5, affine_prob: float = 0.5,
                 rotate: float = 0.1, scale: float = 0.1, intensity_prob: float = 0.5,
                 intensity_scale: float = 0.1, intensity_shift: float = 0.1) -> Compose:
    """Random training augmentation of a preprocessed row (``image`` and ``seg`` together).

    Flips default to the left-right axis only (a brain is close to mirror-symmetric left-right,
    not front-back); a small affine (``rotate`` radians, ``scale`` fraction); intensity scale/shift.
    """
    keys = ["image", "seg"]
    return Compose([
        *[RandFlipd(keys, prob=flip_prob, spatial_axis=a) for a in flip_axes],
        RandAffined(keys, prob=affine_prob, rotate_range=[rotate] * 3, scale_range=[scale] * 3,
                    mode=["bilinear", "nearest"], padding_mode="zeros"),
        RandScaleIntensityd("image", factors=intensity_scale, prob=intensity_prob),
        RandShiftIntensityd("image", offsets=intensity_shift, prob=intensity_prob),
    ])
