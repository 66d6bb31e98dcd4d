"""The per-case driver: raw case -> prepared case folder, with QC, in parallel, resumable.

Output folder (the rules of inference's, `scripts.inference`): never inside the input folder, never over an input
file; everything a run writes is listed in its manifest; a rerun skips the cases already finished there (a case
folder appears only once complete) and ``overwrite`` removes the earlier run's files first. Per case::

    <name>/t1c.nii.gz  t2w.nii.gz  [seg.nii.gz]   the bundle's plain case layout, on the atlas grid, cropped
    <name>/brain_mask.nii.gz                      the T1C's brain mask on the same grid
    <name>/t2w_to_t1c.mat  t1c_to_atlas.mat       the ANTs transforms (kept for the way back)
    <name>/qc.png  qc.json                        the QC picture and the case's QC row

and for the run ``qc.csv`` (every case: Dice, NMI, seconds per step, the gate), ``datalist.json`` (the cases that
pass the gate; with ``labels``, split as `scripts.prepare_datalist` does) and, when some cases fail or image files
form no case, ``preprocess_errors.csv`` and a :class:`PreprocessError` (non-zero exit)."""
from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from scripts.data.datalist import write_datalist
from scripts.data.validate import DatalistError
from scripts.inference import add_to_manifest, atomic_write, file_hash, output_name, read_manifest, write_manifest
from scripts.options import OptionError, as_flag
from scripts.prepare_datalist import assign_splits, read_labels

from . import atlas as atlas_step
from . import bias, brain, coregister, qc, resample
from .discovery import find_raw_cases, read_cases_csv
from .io import read_image, to_ants, write_image

logger = logging.getLogger(__name__)

QC_TABLE, ERRORS, DATALIST = "qc.csv", "preprocess_errors.csv", "datalist.json"
CASE_FILES = ("t1c.nii.gz", "t2w.nii.gz", "brain_mask.nii.gz", "t2w_to_t1c.mat", "t1c_to_atlas.mat", "qc.json")
STEPS = ("read", "n4", "coregister", "brain", "atlas", "resample", "qc")


class PreprocessError(RuntimeError):
    """Some cases were not prepared (or image files formed no case); the message names them and the error list."""


@dataclass(frozen=True)
class Chain:
    """The chain's steps and settings (configs/preprocess.yaml). A step switched off keeps the chain's shape:
    no co-registration = the headers' placement, no brain extraction = the T1C's non-zero voxels (an already
    stripped scan), no atlas registration = the T1C's own grid."""

    n4: bool = False
    coregister: str | None = "Rigid"           # Rigid | Affine | QuickRigid | AffineFast | None
    coregister_iterations: tuple[int, ...] = (1000, 500, 250, 50)  # per level (shrink 6, 4, 2, 1); () ANTs' own
    coregister_spacing: float | None = 2.0     # mm of the copies registered (None: the T1C's grid)
    brain_extraction: bool = True
    atlas: str | None = None                   # None: the shipped SRI24 skull-stripped T1
    atlas_transform: str | None = "Affine"     # Affine (the authors') | AffineFast | None
    crop: bool = True
    crop_margin: int = 8                       # voxels kept around the brain mask's bounding box
    qc_min_dice: float = 0.90                  # gate: brain-mask Dice with the atlas
    qc_min_nmi: float = 1.03                   # gate: T2W-T1C normalised mutual information in the brain
    qc_picture: bool = True
    seed: int = 0                              # ANTs' random metric sampling (ANTs is given seed + 1)
    threads: int = 0                           # per case; 0: the cores shared among the workers

    def __post_init__(self) -> None:  # command-line values arrive as text: "false", "null", "AffineFast"
        for name in ("n4", "brain_extraction", "crop", "qc_picture"):
            object.__setattr__(self, name, as_flag(getattr(self, name), name))
        for name, allowed in (("coregister", coregister.TRANSFORMS), ("atlas_transform", ("Affine", "AffineFast"))):
            value = getattr(self, name)
            value = None if value is False or str(value).strip().lower() in ("", "none", "null", "false") else value
            if value is not None and value not in allowed:
                raise OptionError(f"option --{name} must be one of {', '.join(allowed)} or null, got {value!r}")
            object.__setattr__(self, name, value)
        for name in ("atlas", "coregister_spacing"):  # "null" on the command line: the default
            if str(getattr(self, name)).strip().lower() in ("", "none", "null"):
                object.__setattr__(self, name, None)
        if self.coregister_spacing is not None:
            object.__setattr__(self, "coregister_spacing", float(self.coregister_spacing))
        if isinstance(self.seed, bool) or not str(self.seed).strip().isdigit():
            raise OptionError(f"option --seed must be a whole number >= 0, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))


@contextmanager
def _step(times: dict[str, float], name: str, where: list[str]) -> Iterator[None]:
    where[0] = name
    start = time.perf_counter()
    yield
    times[f"{name}_s"] = round(time.perf_counter() - start, 2)


def _read(case: Mapping[str, str], key: str):
    try:
        return read_image(case[key])
    except (OSError, ValueError, RuntimeError) as err:
        reason = str(err).rpartition("sitk::ERROR: ")[2].strip().replace("\n", " ")  # SimpleITK's own words
        raise DatalistError(str(case["case_id"]), key, f"cannot read {case[key]}: {reason}") from None


_ATLAS: dict[str | None, Any] = {}


def _atlas(path: str | None):
    if path not in _ATLAS:  # read once per process
        _ATLAS[path] = atlas_step.load_atlas(path)
    return _ATLAS[path]


def prepare_case(case: Mapping[str, str], folder: Path, chain: Chain) -> dict[str, Any]:
    """Run the chain on one raw case into `folder` (built beside it, renamed when complete); returns its QC row."""
    work = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    times: dict[str, float] = {}
    where = ["read"]
    case_id = str(case["case_id"])
    try:
        with _step(times, "read", where):
            raw = {k: _read(case, k) for k in ("t1c", "t2w", "seg") if k in case}
        if chain.n4:
            with _step(times, "n4", where):
                raw.update({k: bias.n4(raw[k]) for k in ("t1c", "t2w")})
        images = {k: to_ants(v) for k, v in raw.items()}
        t1c, t2w = images["t1c"], images["t2w"]
        with _step(times, "coregister", where):
            path = work / "t2w_to_t1c.mat"
            t2w_to_t1c = (coregister.coregister(t1c, t2w, path, chain.coregister, chain.coregister_iterations,
                                                chain.coregister_spacing)
                          if chain.coregister else resample.identity_transform(path))
        with _step(times, "brain", where):
            mask = (brain.brain_mask(t1c) if chain.brain_extraction
                    else t1c.new_image_like((t1c.numpy() > 0).astype(np.float32)))
        with _step(times, "atlas", where):
            atlas = _atlas(chain.atlas) if chain.atlas_transform else None
            if atlas is not None:
                t1c_to_atlas = atlas_step.to_atlas(t1c * mask, atlas, work / "t1c_to_atlas.mat", chain.atlas_transform)
            else:
                t1c_to_atlas = resample.identity_transform(work / "t1c_to_atlas.mat")
        with _step(times, "resample", where):
            target = atlas if atlas is not None else t1c
            moved = resample.to_target(target, t1c, t2w, mask, t1c_to_atlas, t2w_to_t1c, images.get("seg"))
            if atlas is not None:
                moved["atlas"] = atlas
            if chain.crop:
                moved = resample.crop(moved, resample.crop_box(moved["mask"], chain.crop_margin))
            prepared = resample.apply_mask(moved)
        with _step(times, "qc", where):
            inside = moved["mask"].numpy() > 0
            row: dict[str, Any] = {
                "case_id": case_id, "folder": folder.name,
                "dice_atlas": round(qc.dice(inside, moved["atlas"].numpy()), 4) if atlas is not None else None,
                "nmi_t1c_atlas": (round(qc.nmi(moved["t1c"].numpy(), moved["atlas"].numpy(), inside), 4)
                                  if atlas is not None else None),
                "nmi_t2w_t1c": round(qc.nmi(moved["t2w"].numpy(), moved["t1c"].numpy(), inside), 4),
                "brain_ml": round(float(inside.sum() * np.prod(moved["mask"].spacing)) / 1000, 1)}
            if chain.qc_picture:
                qc.save_qc_png(work / "qc.png", moved["t1c"].numpy(), moved["t2w"].numpy(), moved["mask"].numpy(),
                               moved["atlas"].numpy() if atlas is not None else None, f"{case_id}: QC")
        for key, dtype in (("t1c", np.float32), ("t2w", np.float32), ("seg", np.uint8), ("mask", np.uint8)):
            if key in prepared:
                write_image(prepared[key], work / ("brain_mask.nii.gz" if key == "mask" else f"{key}.nii.gz"), dtype)
        row.update({f"{s}_s": times.get(f"{s}_s") for s in STEPS}, total_s=round(sum(times.values()), 2))
        row["qc_problem"] = qc.gate(row, chain.qc_min_dice, chain.qc_min_nmi)
        row["qc_pass"] = not row["qc_problem"]
        (work / "qc.json").write_text(json.dumps(row, indent=1) + "\n")
        os.replace(work, folder)
        return row
    except DatalistError:
        raise
    except Exception as err:
        raise DatalistError(case_id, where[0], f"step {where[0]!r} failed: {err}".replace("\n", " ")) from err
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _init_worker(threads: int) -> None:
    """One worker's thread budget for ITK (SimpleITK, ANTs) and torch (deepbet)."""
    import SimpleITK as sitk
    import torch

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    torch.set_num_threads(threads)


@contextmanager
def _thread_budget(threads: int) -> Iterator[None]:
    """`_init_worker(threads)` for the block in this process, then the process's own settings again: a
    caller that forks afterwards (a trainer, a test) must not hand its children a wider OpenMP pool than it
    had, which a forked child can hang on."""
    import SimpleITK as sitk
    import torch

    before = (os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"),
              sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), torch.get_num_threads())
    _init_worker(threads)
    try:
        yield
    finally:
        env, itk, torch_threads = before
        if env is None:
            os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
        else:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = env
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk)
        torch.set_num_threads(torch_threads)


def _run_one(case: Mapping[str, str], folder: Path, chain: Chain) -> tuple[dict | None, dict | None]:
    """(QC row, None) or (None, error row): errors travel back from a worker as plain data."""
    import ants

    # the seed only (no single-thread mode); ANTs reads a seed of 0 as "take the clock", hence + 1
    ants.config.set_ants_deterministic(on=False, seed_value=chain.seed + 1)
    try:
        return prepare_case(case, folder, chain), None
    except DatalistError as err:
        return None, {"case_id": str(case.get("case_id", "?")), "field": err.field,
                      "file": str(case.get(err.field, "")), "problem": err.problem}


def case_folder(out: Path, case: Mapping[str, Any]) -> Path:
    """A case's folder in the output: its case id, encoded as inference names its outputs."""
    return out / output_name(case)


def _complete(folder: Path, case: Mapping[str, Any]) -> bool:
    """`folder` holds every file of a prepared `case` (its qc.json names the case)."""
    try:
        return (all((folder / f).is_file() for f in CASE_FILES)
                and json.loads((folder / "qc.json").read_text()).get("case_id") == str(case["case_id"]))
    except (OSError, ValueError):
        return False


def is_finished(out: Path, case: Mapping[str, Any]) -> bool:
    folder = case_folder(out, case)
    return folder.name in read_manifest(out) and _complete(folder, case)


def prepare_cases(cases: Sequence[Mapping[str, str]], output_dir: str | os.PathLike, chain: Chain,
                  num_workers: int = 1) -> tuple[list[dict], list[dict[str, str]]]:
    """Prepare every case not finished yet (a progress bar; `num_workers` cases at once); returns the QC rows of
    all finished cases and the error rows of the failed ones."""
    out = Path(output_dir)
    todo = [c for c in cases if not is_finished(out, c)]
    if len(todo) < len(cases):
        logger.info(f"{len(cases) - len(todo)} case(s) already prepared in {out}: skipped")
    workers = max(1, min(int(num_workers or 1), len(todo) or 1))
    threads = chain.threads or max(1, (os.cpu_count() or 1) // workers)
    errors: list[dict[str, str]] = []
    bar = tqdm(total=len(todo), desc="preprocessing", unit="case", disable=not todo)

    def collect(case: Mapping[str, str], result: tuple[dict | None, dict | None]) -> None:
        row, error = result
        if error:
            errors.append(error)
            logger.error(f"case {error['case_id']!r}, field {error['field']!r}: {error['problem']}")
        else:
            add_to_manifest(out, {case_folder(out, case).name: None})  # a folder: no hash
            if not row["qc_pass"]:
                logger.warning(f"case {row['case_id']!r} fails the QC gate: {row['qc_problem']} "
                               f"(see {case_folder(out, case) / 'qc.png'})")
        bar.update()

    if workers == 1:
        with _thread_budget(threads):
            for case in todo:
                collect(case, _run_one(case, case_folder(out, case), chain))
    else:
        context = multiprocessing.get_context("spawn")  # no forked copies of torch's or ITK's thread pools
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
            futures = {pool.submit(_run_one, c, case_folder(out, c), chain): c for c in todo}
            for future in as_completed(futures):
                collect(futures[future], future.result())
    bar.close()
    rows = [json.loads((case_folder(out, c) / "qc.json").read_text()) for c in cases if is_finished(out, c)]
    return rows, errors


def prepare_output_dir(output_dir: str | os.PathLike, cases: Sequence[Mapping[str, Any]],
                       input_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Check the output folder before anything is written (inference's rules) and create it.

    Refused: a folder inside `input_dir` or holding an input, two cases with one folder name, a path this
    bundle did not write. An earlier run's files (its manifest) are kept and its finished cases skipped, or
    removed first with `overwrite`."""
    out = Path(output_dir).resolve()
    inputs = [Path(v).resolve() for c in cases for k, v in c.items() if k != "case_id"]
    if input_dir and (out == Path(input_dir).resolve() or Path(input_dir).resolve() in out.parents):
        raise FileExistsError(f"output_dir {out} lies inside input_dir {input_dir}: choose a folder outside it")
    inside = next((p for p in inputs if p == out or out in p.parents), None)
    if inside:
        raise FileExistsError(f"output_dir {out} holds an input ({inside}): choose another folder")
    owners: dict[str, str] = {}
    for case in cases:
        name = case_folder(out, case).name.casefold()
        if name in owners:
            raise FileExistsError(f"cases {owners[name]!r} and {case['case_id']!r} would share the folder "
                                  f"{case_folder(out, case).name}; give each case a distinct case_id")
        owners[name] = str(case["case_id"])
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file, not a folder")
    written = set(read_manifest(out))
    adopted = [case_folder(out, c).name for c in cases if _complete(case_folder(out, c), c)]
    written |= set(adopted)  # a case finished just before a crash, not yet in the manifest
    targets = [case_folder(out, c) for c in cases] + [out / n for n in (QC_TABLE, ERRORS, DATALIST)]
    foreign = [p for p in targets if p.exists() and p.name not in written]
    if any(p.is_dir() for p in foreign) or (foreign and not overwrite):
        raise FileExistsError(f"{foreign[0]} exists and was not written by a preprocessing run of this bundle; "
                              "choose another output_dir" + ("" if foreign[0].is_dir() else " or set overwrite=true"))
    out.mkdir(parents=True, exist_ok=True)
    if adopted:
        add_to_manifest(out, dict.fromkeys(adopted))
    if overwrite:
        for path in {out / n for n in written} | set(foreign):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        write_manifest(out, {})
    return out


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
    add_to_manifest(path.parent, {path.name: file_hash(path)})


def write_datalist_of(out: Path, rows: Sequence[Mapping[str, Any]], labels: str | None = None,
                      val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """``datalist.json`` of the prepared cases that pass the QC gate (paths relative to it): all under
    ``testing`` without `labels`, else labelled and split by `scripts.prepare_datalist` (stratified, seeded)."""
    cases = []
    for row in sorted(rows, key=lambda r: r["case_id"]):
        if row["qc_pass"]:
            folder = out / row["folder"]
            cases.append({"case_id": row["case_id"], "t1c": f"{row['folder']}/t1c.nii.gz",
                          "t2w": f"{row['folder']}/t2w.nii.gz",
                          **({"seg": f"{row['folder']}/seg.nii.gz"} if (folder / "seg.nii.gz").is_file() else {})})
    if labels:
        known = read_labels(labels)
        unknown = sorted(set(known) - {c["case_id"] for c in cases})
        if unknown:
            logger.warning(f"{len(unknown)} labelled case(s) not in the datalist (not found, failed or flagged): "
                           f"{', '.join(unknown[:10])}")
        cases = [{**c, **known.get(c["case_id"], {})} for c in cases]
        tasks = sorted({t for c in known.values() for t in c})
        splits: dict[str, list] = {"training": [], "validation": [], "testing": []}
        for case, split in zip(cases, assign_splits(cases, tasks, val_fraction, test_fraction, 0, 0, seed)):
            splits[split].append(case)
    else:
        splits = {"testing": cases}
    path = out / DATALIST
    write_datalist(path, splits, description="prepared by the bundle's preprocessing (configs/preprocess.yaml)")
    add_to_manifest(out, {DATALIST: file_hash(path)})
    return path


def gather_cases(input_dir: str | None = None, cases_csv: str | None = None) -> tuple[list[dict], list[str]]:
    """The raw cases of `input_dir` and/or `cases_csv`, and the input folders whose image files form no case."""
    if not input_dir and not cases_csv:
        raise ValueError("give --input_dir FOLDER (cases found by their file names) or --cases_csv CSV")
    cases, unclaimed = find_raw_cases(input_dir) if input_dir else ([], [])
    listed = read_cases_csv(cases_csv) if cases_csv else []
    clash = sorted({c["case_id"] for c in cases} & {c["case_id"] for c in listed})
    if clash:
        raise DatalistError(clash[0], "case_id", f"found under {input_dir} and listed in {cases_csv}")
    cases = sorted([*cases, *listed], key=lambda c: c["case_id"])
    if not cases:
        raise DatalistError("*", "input_dir", f"no case found under {input_dir or cases_csv}: looked for T1C + T2W "
                            "NIfTI files or DICOM series folders (docs/preprocessing.md)")
    return cases, unclaimed


def run_preprocessing(output_dir: str, input_dir: str | None = None, cases_csv: str | None = None,
                      chain: Chain | None = None, labels: str | None = None, overwrite: bool = False,
                      num_workers: int = 1, val_fraction: float = 0.2, test_fraction: float = 0.2,
                      seed: int = 0) -> str:
    """The preprocessing workflow (``run preprocessing``): raw cases -> prepared cases, QC table, datalist."""
    chain = chain or Chain()
    cases, unclaimed = gather_cases(input_dir, cases_csv)
    out = prepare_output_dir(output_dir, cases, input_dir, overwrite)
    rows, errors = prepare_cases(cases, out, chain, num_workers)
    errors += [{"case_id": "*", "field": "input_dir", "file": folder,
                "problem": f"image files in {folder} form no case (T1C + T2W expected; name them as "
                           "docs/preprocessing.md says or list them in --cases_csv)"} for folder in unclaimed]
    for error in errors[len(errors) - len(unclaimed):]:
        logger.error(error["problem"])
    fields = ["case_id", "folder", "qc_pass", "qc_problem", "dice_atlas", "nmi_t1c_atlas", "nmi_t2w_t1c", "brain_ml",
              *(f"{s}_s" for s in STEPS), "total_s"]
    if rows:
        _write_csv(out / QC_TABLE, sorted(rows, key=lambda r: r["case_id"]), fields)
        write_datalist_of(out, rows, labels, val_fraction, test_fraction, seed)
    flagged = [r["case_id"] for r in rows if not r["qc_pass"]]
    if flagged:
        logger.warning(f"{len(flagged)} case(s) fail the QC gate and are left out of {DATALIST}: "
                       f"{', '.join(flagged)} (see {out / QC_TABLE})")
    logger.info(f"{len(rows)} case(s) prepared in {out}")
    if errors:
        _write_csv(out / ERRORS, errors, ["case_id", "field", "file", "problem"])
        names = list(dict.fromkeys(e["case_id"] if e["case_id"] != "*" else e["file"] for e in errors))
        raise PreprocessError(f"{len(errors)} problem(s): {', '.join(names[:10])} (first: {errors[0]['problem']}); "
                              f"{len(rows)} case(s) prepared; the list is in {out / ERRORS}")
    (out / ERRORS).unlink(missing_ok=True)
    return str(out)


def load_chain(config_file: str | os.PathLike, **overrides: Any) -> Chain:
    """The chain that a preprocessing config defines (``chain``), with `overrides` that are not None."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_file))
    settings = {**parser.get_parsed_content("chain_settings"), **{k: v for k, v in overrides.items() if v is not None}}
    return Chain(**settings)
