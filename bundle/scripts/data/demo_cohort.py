"""A synthetic, seeded glioma cohort so that the bundle runs out of the box.

Anatomy: the MNI152 (ICBM 2009a) T1 template, grey- and white-matter maps and brain mask that
nilearn ships inside its wheel (nothing is downloaded), warped by a random affine per case.
Each case gets one tumor whose hidden type follows the biology:

==================  =====  ======  ===========  ======
type                idh    1p19q   P(high gr.)  share
==================  =====  ======  ===========  ======
oligodendroglioma   1      1       0.3          0.35
astrocytoma         1      0       0.4          0.25
IDH-wildtype        0      0       0.9          0.40
==================  =====  ======  ===========  ======

so a codeletion implies IDH-mutant, and IDH-wildtype is mostly high grade. Each label shows in
its own imaging phenotype:

- grade: high grade has an enhancing T1C rim around a necrotic core (T1C dark, T2W bright) and a
  larger core; low grade has a non-enhancing core;
- idh: mutant has a very bright T2W core, thin edema, mostly (80%) a frontal site; wildtype has
  a less bright T2W core, wide edema spreading along white matter, mostly a posterior site;
- 1p19q: codeleted has a heterogeneous T2W core with dark calcification clusters and a cortical
  site; intact has a homogeneous core.

Label noise: in every split, for every task, exactly ``round(noise_rate * n)`` of its ``n``
cases show the phenotype of the other class (the labels themselves always obey the biology).
The mask is BraTS-style (1 necrotic/non-enhancing core, 2 edema, 4 enhancing).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from .datalist import TASKS, write_datalist

TYPES = (  # name, idh, 1p19q, P(high grade), share
    ("oligodendroglioma", 1, 1, 0.3, 0.35),
    ("astrocytoma", 1, 0, 0.4, 0.25),
    ("idh_wildtype", 0, 0, 0.9, 0.40),
)
LABEL_RATES = {"1p19q": 0.7, "idh": 0.75, "grade": 0.8}  # share of training cases labelled per task
FIELD_OF_VIEW_MM = ((-80.0, 80.0), (-120.0, 84.0), (-78.0, 90.0))  # RAS box that holds the brain
DATALIST_NAME = "datalist.json"
MANIFEST_NAME = "cohort.json"
# (T1C, T2W) of the tissues, in units of white matter's T1C
TISSUE = {"wm": (1.0, 0.5), "gm": (0.75, 0.7), "csf": (0.3, 1.4)}


@lru_cache(maxsize=4)
def _template(spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Grey matter, white matter and brain mask at 1 mm, pre-smoothed for sampling at ``spacing``,
    stacked [3, X, Y, Z]; and the 1 mm grid's affine."""
    from nilearn import datasets  # heavy import, only when a cohort is made

    images = [datasets.load_mni152_gm_template(resolution=1), datasets.load_mni152_wm_template(resolution=1),
              datasets.load_mni152_brain_mask(resolution=1)]
    sigma = max(0.0, spacing / 2.5)
    maps = np.stack([ndimage.gaussian_filter(np.asarray(i.dataobj, dtype=np.float32), sigma) for i in images])
    return maps, np.asarray(images[0].affine, dtype=np.float64)


def grid_affine(spacing: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RAS affine and shape of the demo grid at ``spacing`` mm."""
    lo = np.array([b[0] for b in FIELD_OF_VIEW_MM])
    shape = tuple(int(np.ceil((b[1] - b[0]) / spacing)) for b in FIELD_OF_VIEW_MM)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    return affine, shape


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rx @ ry @ rz


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-8)


def _anatomy(rng: np.random.Generator, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-case tissue maps (gm, wm, csf, brain mask) on the demo grid after a random affine warp."""
    maps, template_affine = _template(spacing)
    affine, shape = grid_affine(spacing)
    center = np.array([0.0, -18.0, 8.0])
    warp = _rotation(rng.uniform(-0.09, 0.09, 3)) @ np.diag(rng.uniform(0.93, 1.04, 3))
    # grid voxel -> world -> unwarped world -> template voxel, as one affine map
    unwarp = np.eye(4)
    unwarp[:3, :3] = np.linalg.inv(warp)
    unwarp[:3, 3] = center - unwarp[:3, :3] @ center + rng.uniform(-3, 3, 3)
    to_template = np.linalg.inv(template_affine) @ unwarp @ affine
    gm, wm, mask = (ndimage.affine_transform(m, to_template[:3, :3], to_template[:3, 3], output_shape=shape, order=1)
                    for m in maps)
    brain = mask > 0.5
    gm, wm = gm * brain, wm * brain
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    return gm, wm, csf, brain


def _place(rng: np.random.Generator, brain: np.ndarray, world: np.ndarray, radius_vox: float, frontal: bool,
           cortical: bool) -> np.ndarray:
    """A tumor center (voxel index) inside the brain, in the requested region where possible."""
    depth = ndimage.distance_transform_edt(brain)
    y = world[..., 1]
    region = (y > 5) if frontal else (y < -25)
    fits = depth >= max(2.0, 0.7 * radius_vox)
    shallow = depth <= 0.7 * radius_vox + 3 if cortical else depth > 0.7 * radius_vox + 2
    for candidates in (fits & region & shallow, fits & region, fits, brain):
        idx = np.argwhere(candidates)
        if len(idx):
            return idx[rng.integers(len(idx))]
    raise RuntimeError("empty brain mask")


def make_case(rng: np.random.Generator, phenotype: dict[str, int], spacing: float = 4.0,
              t2w_slice_mm: float | None = None, lps: bool = False) -> dict[str, nib.Nifti1Image]:
    """The T1C, T2W and mask NIfTI images of one case with the given imaging ``phenotype``
    (``grade``, ``idh``, ``1p19q`` each 0/1).

    ``t2w_slice_mm`` stores T2W on its own grid with that slice thickness (as clinical series);
    ``lps`` stores all volumes in LPS orientation.
    """
    high, mutant, codel = phenotype["grade"], phenotype["idh"], phenotype["1p19q"]
    gm, wm, csf, brain = _anatomy(rng, spacing)
    affine, shape = grid_affine(spacing)
    world = np.stack(np.meshgrid(*[affine[i, 3] + spacing * np.arange(n) for i, n in enumerate(shape)],
                                 indexing="ij"), -1)
    r_core = rng.uniform(15.0, 22.0) + (3.0 if high else 0.0)
    r_edema = r_core * (rng.uniform(1.2, 1.35) if mutant else rng.uniform(1.65, 2.0))
    frontal = bool(rng.random() < 0.8) == bool(mutant)
    center = _place(rng, brain, world, r_core / spacing, frontal, cortical=bool(codel))
    dist = np.linalg.norm(world - world[tuple(center)], axis=-1)
    sigma = 6.0 / spacing
    n_core, n_edema, n_necro, n_tex = (_smooth_noise(rng, shape, sigma) for _ in range(4))
    core = (dist / r_core + 0.2 * n_core < 1.0) & brain
    edema = (dist / r_edema + 0.2 * n_edema - 0.25 * (wm - 0.5) < 1.0) & brain & ~core
    necrosis = core & (dist / r_core + 0.15 * n_necro < 0.5) if high else np.zeros_like(core)
    rim = core & ~necrosis if high else np.zeros_like(core)
    specks = core & ~necrosis & (_smooth_noise(rng, shape, 1.0) > 0.8) if codel else np.zeros_like(core)

    t1 = wm * TISSUE["wm"][0] + gm * TISSUE["gm"][0] + csf * TISSUE["csf"][0]
    t2 = wm * TISSUE["wm"][1] + gm * TISSUE["gm"][1] + csf * TISSUE["csf"][1]
    t1[edema] *= 0.75
    t2[edema] = 0.4 * t2[edema] + 0.95
    t1[core] = 0.5
    t2[core] = (1.35 if mutant else 1.0) + (0.3 if codel else 0.03) * n_tex[core]
    t1[rim] = 1.6
    t2[rim] = 1.2 if mutant else 0.95
    t1[necrosis], t2[necrosis] = 0.25, 1.5
    t1[specks], t2[specks] = 0.1, 0.15

    bias = 1.0 + 0.08 * _smooth_noise(rng, shape, 12.0 / spacing)
    volumes = []
    for image in (t1, t2):
        image = ndimage.gaussian_filter(image, 0.5) * bias * rng.uniform(0.8, 1.25)
        image = (image + 0.03 * rng.standard_normal(shape)) * brain
        volumes.append(np.clip(np.round(1000.0 * image), 0, None).astype(np.int16))
    seg = np.zeros(shape, np.uint8)
    seg[edema], seg[core], seg[rim] = 2, 1, 4

    t2_affine = affine
    if t2w_slice_mm:
        zoom = t2w_slice_mm / spacing
        blurred = ndimage.gaussian_filter1d(volumes[1].astype(np.float32), 0.4 * zoom, axis=2)
        out_shape = (*shape[:2], int(np.ceil(shape[2] / zoom)))
        volumes[1] = np.round(ndimage.affine_transform(blurred, [1.0, 1.0, zoom], output_shape=out_shape,
                                                       order=1)).astype(np.int16)
        t2_affine = affine @ np.diag([1.0, 1.0, zoom, 1.0])
    images = {"t1c": (volumes[0], affine), "t2w": (volumes[1], t2_affine), "seg": (seg, affine)}
    if lps:
        images = {k: _to_lps(*v) for k, v in images.items()}
    return {k: nib.Nifti1Image(data, aff) for k, (data, aff) in images.items()}


def _to_lps(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with its first two axes reversed (RAS -> LPS voxel order)."""
    flipped = affine.copy()
    for axis in (0, 1):
        flipped[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)
        flipped[:3, axis] *= -1
    return np.ascontiguousarray(data[::-1, ::-1]), flipped


def _draw_labels(rng: np.random.Generator) -> dict[str, int]:
    shares = np.array([t[4] for t in TYPES])
    _, idh, codel, p_high, _ = TYPES[rng.choice(len(TYPES), p=shares / shares.sum())]
    return {"1p19q": codel, "idh": idh, "grade": int(rng.random() < p_high)}


def plan_cohort(seed: int = 0, n_train_cls: int = 150, n_train_seg: int = 40, n_val: int = 40,
                n_test: int = 40, noise_rate: float = 0.05) -> list[dict[str, Any]]:
    """Every case's split, true labels, visible labels, imaging phenotype and storage options,
    without any image (cheap; the part of the cohort the tests reason about)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    groups = (("training", "cls", n_train_cls), ("training", "seg", n_train_seg),
              ("validation", "eval", n_val), ("testing", "eval", n_test))
    plan: list[dict[str, Any]] = []
    for split, role, n in groups:
        cases = []
        for _ in range(n):
            truth = _draw_labels(rng)
            if role == "cls":
                shown = [t for t in TASKS if rng.random() < LABEL_RATES[t]] or [TASKS[rng.integers(len(TASKS))]]
            else:
                shown = list(TASKS) if role == "eval" else []
            cases.append({"split": split, "role": role, "truth": truth, "labels": {t: truth[t] for t in shown},
                          "phenotype": dict(truth), "lps": bool(rng.random() < 1 / 3),
                          "t2w_slice_mm": 6.0 if rng.random() < 0.2 else None})
        plan += cases
    for split in ("training", "validation", "testing"):
        members = [c for c in plan if c["split"] == split]
        for task in TASKS:
            for i in rng.choice(len(members), int(round(noise_rate * len(members))), replace=False):
                members[i]["phenotype"][task] = 1 - members[i]["truth"][task]
    for number, case in enumerate(plan):
        case["case_id"] = f"demo{number:04d}"
    return plan


def _write_case(out: Path, seed: int, number: int, case: dict[str, Any], spacing: float) -> dict[str, Any]:
    """Make and save case ``number`` of the plan; returns its datalist entry."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2, number]))
    images = make_case(rng, case["phenotype"], spacing, case["t2w_slice_mm"], case["lps"])
    folder = out / "cases" / case["case_id"]
    folder.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"case_id": case["case_id"]}
    for key in ("t1c", "t2w", "seg"):
        if key == "seg" and case["role"] == "cls":
            continue
        nib.save(images[key], folder / f"{key}.nii.gz")
        entry[key] = f"cases/{case['case_id']}/{key}.nii.gz"
    return {**entry, **case["labels"]}


def generate_cohort(output_dir: str | os.PathLike, seed: int = 0, n_train_cls: int = 150, n_train_seg: int = 40,
                    n_val: int = 40, n_test: int = 40, spacing: float = 4.0, noise_rate: float = 0.05,
                    num_workers: int = 2) -> str:
    """Write the demo cohort (``cases/<id>/{t1c,t2w,seg}.nii.gz``, ``datalist.json``, and
    ``cohort.json`` with every case's truth and phenotype) into ``output_dir``; returns the
    datalist path. Deterministic for a given seed and arguments, whatever ``num_workers`` (forked
    processes where the platform forks)."""
    started = time.time()
    out = Path(output_dir)
    plan = plan_cohort(seed, n_train_cls, n_train_seg, n_val, n_test, noise_rate)
    _template(spacing)  # load once, before any fork
    jobs = [(out, seed, number, case, spacing) for number, case in enumerate(plan)]
    if num_workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork")) as pool:
            entries = list(pool.map(_write_case, *zip(*jobs), chunksize=8))
    else:
        entries = [_write_case(*job) for job in jobs]
    splits: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "testing": []}
    for case, entry in zip(plan, entries):
        splits[case["split"]].append(entry)
    manifest = {"generator": "scripts.data.demo_cohort", "seed": seed, "spacing": spacing,
                "noise_rate": noise_rate, "types": [list(t) for t in TYPES], "label_rates": LABEL_RATES,
                "seconds": round(time.time() - started, 1), "cases": plan}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return write_datalist(out / DATALIST_NAME, splits,
                          description="IGReg synthetic demo cohort (see cohort.json); not real patients")


def ensure_demo_cohort(dataset_dir: str | os.PathLike, **kwargs: Any) -> str:
    """The datalist of the demo cohort in ``dataset_dir``, generating it first when the folder is
    missing or empty (``kwargs`` go to :func:`generate_cohort`). A folder that holds other files
    but no datalist is left alone and raises."""
    folder = Path(dataset_dir)
    datalist = folder / DATALIST_NAME
    if datalist.is_file():
        return str(datalist)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty and has no {DATALIST_NAME}: point dataset_dir at an "
                              "empty folder for the demo cohort, or at your datalist's folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=folder.parent))
    try:
        generate_cohort(staging, **kwargs)
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(datalist)
