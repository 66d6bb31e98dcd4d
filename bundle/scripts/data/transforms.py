"""MONAI transforms that bring a glioma case from NIfTI files to the tensors of one batch row.

:func:`preprocessing_transforms` is the one definition of the deterministic chain: the bundle configs
(training, validation, evaluation and inference) and :func:`preprocessing` all build it from there.
:func:`augmentation` builds the training augmentation that train.yaml spells out in YAML.
Output keys: ``image`` [2, *S] (T1C, T2W; z-scored), ``seg`` [1, *S] binary, ``has_seg`` (bool),
``label`` [T] int64 with -1 for a missing label, ``case_id``.
"""
from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection, PathLike
from monai.data import MetaTensor, NibabelReader
from monai.transforms import (
    Compose,
    ConcatItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientation,
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
from .intensity import BRAIN_REL_TOL, robust_intensity

MISSING = -1  # label value of "no label for this task"


class AffineNibabelReader(NibabelReader):
    """MONAI's NIfTI reader with nibabel's affine (the sform, else the qform), the geometry the input check
    and the mask writer use. MONAI's own reader replaces the sform by the qform when the header's pixdim
    disagrees with it (a 6 mm sform over pixdim 6/6/7.5 would become 7.5 mm slices); files whose pixdim
    agrees with the sform, as every clean scan, read the same either way."""

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs):
        names = [data] if isinstance(data, (str, bytes)) or not isinstance(data, Sequence) else list(data)
        self.filenames = names
        images = [nib.load(name, **{**self.kwargs, **kwargs}) for name in names]
        return images if len(images) > 1 else images[0]


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


class OrientLiked(MapTransform):
    """Reorder and flip the axes of ``keys`` into the axis codes of ``key_dst`` (exact: no interpolation).

    Before ``ResampleToMatchd``, this makes a T2W that stores the same grid as the T1C with other axis
    directions (RAS against LPS) match it exactly, so resampling is a no-op instead of an interpolation that
    leaves residue (values near 1e-11) around the brain.
    """

    def __init__(self, keys: KeysCollection, key_dst: str, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.key_dst = key_dst

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        codes = "".join(nib.aff2axcodes(np.asarray(d[self.key_dst].affine, dtype=np.float64)))
        orient = Orientation(axcodes=codes, labels=None)
        for key in self.key_iterator(d):
            d[key] = orient(d[key])
        return d


class RobustIntensityd(MapTransform):
    """Move a constant non-zero background (e.g. -1000) to 0 and clip extreme outliers (one voxel of 1e7)
    of each single-channel volume of ``keys`` (:func:`scripts.data.intensity.robust_intensity`).

    A volume with a zero background and no outlier, as every clean scan, is passed on untouched, bit for bit.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            values = np.asarray(img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else img)
            fixed = [robust_intensity(channel) for channel in values]
            if all(f is v for f, v in zip(fixed, values)):
                continue
            out = torch.as_tensor(np.stack(fixed), dtype=torch.float32)
            d[key] = MetaTensor(out, meta=dict(img.meta), applied_operations=list(img.applied_operations)) \
                if isinstance(img, MetaTensor) else out
        return d


class BrainZScored(MapTransform):
    """Z-score every channel over the brain of one reference channel (T1C) and set the rest to exactly 0.

    The brain is where ``reference > rel_tol * max(reference)`` (the T1C's own positive foreground, the voxels
    the crop keeps; a background below 0 is moved to 0 before, by :class:`RobustIntensityd`). Unlike
    ``NormalizeIntensityd(nonzero=True)``, which takes each channel's own nonzero voxels, interpolation residue
    (values near 1e-11 that a resampled T2W leaves next to the brain) cannot count as brain: the mask, and so each
    channel's mean and std, depend on the reference channel alone, and the result is continuous in the other
    channels' values.
    """

    def __init__(self, keys: KeysCollection, ref_channel: int = 0, rel_tol: float = BRAIN_REL_TOL,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_channel, self.rel_tol = ref_channel, rel_tol

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            src = img.as_tensor() if isinstance(img, MetaTensor) else img
            src = src.to(torch.float32)
            ref = src[self.ref_channel]
            peak = ref.max()
            brain = ref > self.rel_tol * peak if peak > 0 else torch.zeros_like(ref, dtype=torch.bool)
            res = torch.zeros_like(src)
            for c in range(src.shape[0]):
                values = src[c][brain]
                if values.numel():
                    std = values.std(unbiased=False)
                    res[c][brain] = (values - values.mean()) / (std if std > 0 else 1.0)
            d[key] = MetaTensor(res, meta=dict(img.meta), applied_operations=list(img.applied_operations)) \
                if isinstance(img, MetaTensor) else res
        return d


def preprocessing_transforms(pixdim: float | Sequence[float] = 1.0,
                             spatial_size: Sequence[int] = (160, 192, 160)) -> list:
    """The deterministic chain shared by training, validation, evaluation and inference (train.yaml's
    ``preprocessing_transforms``, inference.yaml's ``preprocessing``): case {t1c, t2w[, seg]} -> image [2, *S]
    (T1C, T2W; + seg [1, *S]).

    Load (:class:`AffineNibabelReader`: the sform is the geometry), channel first, move a constant non-zero
    background to 0 and clip extreme outliers (a no-op on clean scans: :class:`RobustIntensityd`), binarise the
    mask, give T2W and the mask the T1C's axis directions (a pure axis flip or permutation is exact, so how a file
    stores the scan does not matter), resample them onto the T1C grid (a no-op when the grids already agree), stack
    the channels, RAS (exact flips; kept after the stacking so that inference can invert it onto the T1C file's
    grid), ``pixdim`` spacing, crop to the T1C brain, pad/crop to
    ``spatial_size``, z-score each channel over the T1C brain with the background exactly 0 (:class:`BrainZScored`).
    """
    image_keys, spatial_keys = ["t1c", "t2w", "seg"], ["image", "seg"]
    return [
        LoadImaged(image_keys, reader=AffineNibabelReader(), image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(image_keys, allow_missing_keys=True),
        RobustIntensityd(["t1c", "t2w"], allow_missing_keys=True),
        BinarizeMaskd("seg", allow_missing_keys=True),
        OrientLiked(["t2w", "seg"], key_dst="t1c", allow_missing_keys=True),
        ResampleToMatchd(["t2w", "seg"], key_dst="t1c", mode=["bilinear", "nearest"], padding_mode="zeros",
                         allow_missing_keys=True),
        ConcatItemsd(["t1c", "t2w"], name="image"),
        DeleteItemsd(["t1c", "t2w"]),
        Orientationd(spatial_keys, axcodes="RAS", labels=None, allow_missing_keys=True),
        Spacingd(spatial_keys, pixdim=pixdim, mode=["bilinear", "nearest"], allow_missing_keys=True),
        CropForegroundd(spatial_keys, source_key="image", channel_indices=0, start_coord_key=None,
                        end_coord_key=None, allow_missing_keys=True),
        ResizeWithPadOrCropd(spatial_keys, spatial_size=spatial_size, allow_missing_keys=True),
        BrainZScored("image", ref_channel=0),
    ]


def preprocessing(pixdim: float | Sequence[float] = 1.0, spatial_size: Sequence[int] = (160, 192, 160),
                  tasks: Sequence[str] | None = TASKS) -> Compose:
    """:func:`preprocessing_transforms` with the training targets (mask, labels), or (``tasks=None``) without
    them, for inference."""
    chain = preprocessing_transforms(pixdim, spatial_size)
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
