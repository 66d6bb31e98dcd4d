"""The bad-input pass: every case of a datalist is checked before any training or inference starts.

Each problem raises :class:`DatalistError`, whose message names the split, the case and the field,
so that a bad file never surfaces as a crash deep inside a DataLoader worker.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from .datalist import IMAGE_KEYS, KNOWN_KEYS, SEG_KEY, SPLITS, TASKS, key_hint, load_datalist, read_datalist
from .intensity import BRAIN_REL_TOL, brain_mask, robust_intensity

logger = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MIN_MASK_INSIDE = 0.99  # share of tumor voxels that must fall inside the T1C field of view
MIN_BRAIN_COVERED = 0.9  # share of T1C brain voxels that the T2W field of view must cover
MIN_BRAIN_SHARE = 0.5  # share of the T1C's non-zero voxels that must count as brain after scaling and clipping


class DatalistError(ValueError):
    """A bad case in a datalist; ``case`` and ``field`` say where."""

    def __init__(self, case: str, field: str, problem: str, split: str | None = None):
        self.case, self.field, self.problem, self.split = case, field, problem, split
        where = f"{split} case '{case}'" if split else f"case '{case}'"
        # "*": a problem of the whole list or folder, whose text names it
        super().__init__(problem if case == "*" else f"{where}, field '{field}': {problem}")


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) of an affine: the norms of its first three columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0))


def _mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.4g}" for v in values) + " mm"


def warn_geometry(img: nib.Nifti1Image, path: str) -> None:
    """Log where the header's pixdim disagrees with the affine. The one geometry of a file is nibabel's
    affine (the sform, else the qform): the check, the loader (``AffineNibabelReader``) and the writer of
    the predicted mask all use it, and the pixdim (0 when unset) is not used."""
    affine_sizes = voxel_sizes(img.affine)
    pixdim = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    if not np.allclose(pixdim, affine_sizes, rtol=1e-3, atol=1e-4):
        logger.warning(f"{path}: header pixdim {_mm(pixdim)} disagrees with its sform voxels {_mm(affine_sizes)}; "
                       "the sform is used (by the input check, the loader and the mask writer)")


class _Volume:
    """Shape, affine and voxels of one NIfTI file, with the checks every volume must pass.

    The voxels are those the loader gives: scaled by the header's slope/intercept and cast to
    float32, so values beyond float32's range count as infinite."""

    def __init__(self, path: Any):
        if not isinstance(path, str) or not path:
            raise ValueError(f"expected a file path, got {path!r}")
        if not path.endswith(NIFTI_SUFFIXES):
            raise ValueError(f"not a NIfTI file name (.nii or .nii.gz): {path}")
        if not os.path.isfile(path):
            raise ValueError(f"file not found: {path}")
        try:
            img = nib.load(path)
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise TypeError(f"{type(img).__name__} is not NIfTI")
            data = np.asanyarray(img.dataobj)
        except Exception as err:  # nibabel raises many types for corrupt or foreign files
            raise ValueError(f"unreadable NIfTI file {path}: {type(err).__name__}: {err}") from None
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {tuple(data.shape)} in {path}")
        with np.errstate(over="ignore", invalid="ignore"):
            data = data.astype(np.float32)  # as the loader reads it
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise ValueError(f"{bad} NaN or Inf voxels (after scaling to float32) in {path}")
        if not np.any(data):
            raise ValueError(f"all-zero volume: {path}")
        affine = np.asarray(img.affine, dtype=np.float64)
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
            raise ValueError(f"invalid (singular or non-finite) affine in {path}")
        warn_geometry(img, path)
        self.data, self.affine, self.shape, self.path = data, affine, data.shape, path

    def same_grid(self, other: _Volume) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=1e-3)

    def share_inside(self, voxels_world: np.ndarray) -> float:
        """Share of world points (N, 3) that fall inside this volume's field of view."""
        ijk = (np.linalg.inv(self.affine) @ np.c_[voxels_world, np.ones(len(voxels_world))].T)[:3].T
        inside = np.all((ijk > -0.5) & (ijk < np.asarray(self.shape) - 0.5), axis=1)
        return float(inside.mean()) if len(inside) else 0.0

    def world(self, mask: np.ndarray, stride: int = 1) -> np.ndarray:
        """World coordinates of the voxels where ``mask`` is true (every ``stride``-th along each axis)."""
        ijk = np.argwhere(mask[::stride, ::stride, ::stride]) * stride
        return (self.affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T


def brain_problem(t1c: np.ndarray, path: str) -> str | None:
    """Why the brain the network would see in this T1C (after the chain's background shift, outlier
    clipping and brain threshold, :mod:`scripts.data.intensity`) is empty or implausibly small, or None."""
    values = robust_intensity(t1c)
    brain = int(brain_mask(values).sum())
    nonzero = int(np.count_nonzero(values))
    where = f"values {float(t1c.min()) + 0.0:.4g} to {float(t1c.max()) + 0.0:.4g} after the header's scaling, in {path}"
    if brain == 0:
        return f"no T1C voxel is above 0, so the network would see an empty brain ({where}; a negative scl_slope?)"
    if brain < MIN_BRAIN_SHARE * nonzero:
        return (f"only {brain} of its {nonzero} non-zero voxels count as brain (above {BRAIN_REL_TOL:g} of the "
                f"maximum {float(values.max()):.4g}): a few extreme values dominate the image ({where})")
    return None


def _check_label(value: Any) -> str | None:
    """Why ``value`` is not a valid 0/1 label, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        return f"label must be 0 or 1, got {value!r}"
    return None


def check_case(case: Mapping[str, Any], tasks: Sequence[str] = TASKS, split: str | None = None) -> None:
    """Raise :class:`DatalistError` for the first problem of one resolved case."""
    name = str(case.get("case_id", "?"))

    def fail(field: str, problem: str) -> DatalistError:
        return DatalistError(name, field, problem, split)

    for task in tasks:
        if task in case and (problem := _check_label(case[task])) is not None:
            raise fail(task, problem)
    volumes: dict[str, _Volume] = {}
    for key in (*IMAGE_KEYS, SEG_KEY):
        if key not in case:
            if key == SEG_KEY:
                continue
            raise fail(key, "missing (every case needs t1c and t2w)")
        try:
            volumes[key] = _Volume(case[key])
        except ValueError as err:
            raise fail(key, str(err)) from None
    t1c = volumes["t1c"]
    t2w = volumes["t2w"]
    problem = brain_problem(t1c.data, t1c.path)
    if problem:
        raise fail("t1c", problem)
    if not t2w.same_grid(t1c):
        covered = t2w.share_inside(t1c.world(brain_mask(robust_intensity(t1c.data)), stride=2))
        if covered < MIN_BRAIN_COVERED:
            raise fail("t2w", f"its field of view covers only {covered:.0%} of the T1C brain, "
                              "so it cannot be resampled onto the T1C grid")
    seg = volumes.get(SEG_KEY)
    if seg is not None:
        odd = np.unique(seg.data[(seg.data != np.round(seg.data)) | (seg.data < 0)])
        if odd.size:
            logger.warning(f"case '{name}', field 'seg': the mask holds values that are not label numbers (e.g. "
                           f"{float(odd[0]):.4g}; {odd.size} distinct) in {seg.path}: every value above 0 counts as "
                           "tumor, so a probability map or a smoothed mask is read as tumor wherever it is > 0")
    if seg is not None and not seg.same_grid(t1c):
        inside = t1c.share_inside(seg.world(seg.data > 0))
        if inside < MIN_MASK_INSIDE:
            raise fail(SEG_KEY, f"mask cannot be brought onto the T1C grid: only {inside:.0%} of its "
                                "tumor voxels lie inside the T1C field of view")


def validate_datalist(datalist: str | os.PathLike | Mapping[str, Any], base_dir: str | os.PathLike | None = None,
                      tasks: Sequence[str] = TASKS, splits: Sequence[str] = SPLITS,
                      num_workers: int = 2, errors: list[DatalistError] | None = None,
                      warnings: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Check every case of ``splits``; raise :class:`DatalistError` naming the first bad case and field.

    Besides each case's files and labels: a case id twice, the same image file under two case ids
    (leakage between splits), no case at all in ``splits`` (or none in ``training`` when it is
    checked without ``testing``, as training does) are errors; keys that are not case fields
    (e.g. ``IDH``, or the decathlon ``label`` for the mask) are ignored with a warning that suggests
    the right key.

    Args:
        datalist: the datalist JSON path or its content.
        base_dir: folder of relative paths (default: the JSON's folder).
        tasks: task labels to check (other keys are ignored).
        splits: which lists to check; absent lists are skipped.
        num_workers: threads reading volumes in parallel.
        errors: when given, every problem is appended here instead of the first being raised.
        warnings: when given, the warnings are appended here too (they are logged in any case).

    Returns:
        per split: ``cases``, ``seg`` (cases with a mask) and per task ``[n_class0, n_class1]``.
    """
    content = read_datalist(datalist)
    where = "datalist" if isinstance(datalist, Mapping) else f"datalist {os.fspath(datalist)}"
    if base_dir is None:
        base_dir = os.getcwd() if isinstance(datalist, Mapping) else os.path.dirname(os.path.abspath(datalist))
    found: list[DatalistError] = [] if errors is None else errors

    def fail(err: DatalistError) -> None:
        if errors is None:
            raise err
        found.append(err)

    summary: dict[str, dict[str, Any]] = {}
    seen: Counter[str] = Counter()
    files: dict[str, tuple[str, str]] = {}
    unknown: dict[tuple[str, str], list[str]] = {}
    for split in splits:
        raw = content.get(split) or []
        if not isinstance(raw, list):
            fail(DatalistError("*", split, f"'{split}' must be a list of cases in {where}", split))
            continue
        objects = []
        for i, case in enumerate(raw):
            if not isinstance(case, Mapping):
                fail(DatalistError(f"#{i}", "*", f"expected an object, got {type(case).__name__}", split))
            else:
                objects.append(case)
        cases = load_datalist({split: objects}, split, base_dir)
        good = []
        for case in cases:
            name = case["case_id"]
            for key in case:
                if key not in KNOWN_KEYS:
                    unknown.setdefault((split, key), []).append(name)
            seen[name] += 1
            if seen[name] > 1:
                fail(DatalistError(name, "case_id", "the same case appears twice in the datalist", split))
                continue
            leak = None
            for key in IMAGE_KEYS:
                path = case.get(key)
                if not isinstance(path, str) or not path:
                    continue
                real = os.path.realpath(path)
                other = files.get(real)
                if other is not None and other[0] != name and leak is None:
                    leak = DatalistError(name, key, f"{path} is also the image of case '{other[0]}' ({other[1]}): "
                                                    "the same images under two ids (leakage between splits)", split)
                files.setdefault(real, (name, split))
            if leak is not None:
                fail(leak)
                continue
            good.append(case)

        def check(c: Mapping[str, Any]) -> DatalistError | None:
            try:
                check_case(c, tasks, split)
            except DatalistError as err:
                return err
            return None

        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            for err in pool.map(check, good):
                if err is not None:
                    fail(err)
        summary[split] = {"cases": len(cases), "seg": sum(SEG_KEY in c for c in cases),
                          **{t: [sum(c.get(t) == k for c in cases) for k in (0, 1)] for t in tasks}}
    for (split, key), names in unknown.items():
        text = (f"{where}: unknown key '{key}' in {len(names)} {split} case(s) (first: '{names[0]}') is ignored"
                f"{key_hint(key)}")
        logger.warning(text)
        if warnings is not None:
            warnings.append(text)
    training_run = "training" in splits and "testing" not in splits  # train.yaml checks training + validation
    if training_run and "training" in summary and not summary["training"]["cases"]:
        fail(DatalistError("*", "training", f"{where} has no training cases", "training"))
    elif summary and not any(v["cases"] for v in summary.values()):
        fail(DatalistError("*", "*", f"{where} has no cases in {'/'.join(splits)}"))
    elif not summary and not found:
        fail(DatalistError("*", "*", f"{where} has no {'/'.join(splits)} lists"))
    return summary
