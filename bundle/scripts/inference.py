"""Inference on new cases: input discovery, the per-case input check, output-folder safety,
prediction post-processing and writers.

Safety rules (see docs/reliability.md):

- each case's outputs are named from its full case id by :func:`output_name`, an injective
  file-name encoding, and two cases mapping to one name are refused before anything is written;
- no output path may be a file that the datalist or ``input_dir`` names (masks included);
- every case passes the training's input check (:func:`scripts.data.check_case`) plus a minimum
  field of view; a bad case gets no prediction, the good ones are predicted, and the run ends with
  ``prediction_errors.csv`` and an :class:`InferenceError` naming the bad cases;
- probabilities that are not finite are never written (the case is reported as bad instead);
- ``overwrite`` replaces an earlier run: the files its manifest lists are removed first, so the
  folder holds only this run's files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import MapTransform

from scripts.checkpoint import write_failure
from scripts.data import DatalistError, check_case, find_cases, load_datalist, read_datalist
from scripts.data.datalist import IMAGE_KEYS, PATH_KEYS, SPLITS
from scripts.data.discovery import NIFTI, PLAIN, PREFIXED
from scripts.data.intensity import brain_mask, robust_intensity
from scripts.data.validate import voxel_sizes
from scripts.jsonio import strict_json
from scripts.options import acquire_lock, release_lock

logger = logging.getLogger(__name__)

MANIFEST = ".igreg_outputs.json"  # the files an inference run wrote, with their hashes (for overwrite)
INCOMPLETE = ".igreg_incomplete"  # present while a run is writing: left behind by a run that died
INFERENCE_LOCK = ".igreg_inference.lock"  # one inference run at a time per output folder
TABLE = "predictions.csv"
ERRORS = "prediction_errors.csv"
RUN_FILES = (TABLE, ERRORS, MANIFEST)
INDEX = "index.html"  # the saliency run's overview page (only with --saliency)
MIN_SIDE_VOXELS = 8  # an input with fewer voxels on an axis cannot be resampled into a brain volume
MIN_SIDE_MM = 64.0  # nor one whose field of view is narrower than this (a brain spans about 140 mm)
MAX_BRAIN_ML = 2500.0  # a T1C foreground larger than this is a whole head (a brain is 1000-2000 mL)
MAX_NAME_BYTES = 255  # the longest file name most file systems take
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class OutputExistsError(FileExistsError):
    """The output folder already holds predictions of an earlier run, or an output would replace an input."""


class InferenceError(RuntimeError):
    """Some cases got no prediction; the message names them and the error list."""


def output_name(case: Mapping[str, Any] | str) -> str:
    """File-name stem of a case's outputs: its full `case_id`, injectively encoded.

    Letters, digits, ``.``, ``_`` and ``-`` are kept; every other character (``/``, ``%``, spaces,
    ...) and a leading ``.`` become ``%XX`` (UTF-8 bytes, as in URLs), so `site/P1` gives
    `site%2FP1`, distinct from `site_P1`, and `sub01.ses1` keeps its dot."""
    text = str(case["case_id"] if isinstance(case, Mapping) else case)
    out = []
    for i, ch in enumerate(text):
        if ch in _SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out) or "%00"


def mask_path(output_dir: str | os.PathLike, case: Mapping[str, Any]) -> Path:
    """Where the predicted mask of a case goes: `<output name>_seg.nii.gz`."""
    return Path(output_dir) / f"{output_name(case)}_seg.nii.gz"


def json_path(output_dir: str | os.PathLike, case: Mapping[str, Any]) -> Path:
    """Where the class probabilities of a case go: `<output name>.json`."""
    return Path(output_dir) / f"{output_name(case)}.json"


def saliency_path(output_dir: str | os.PathLike, case: Mapping[str, Any], task: str) -> Path:
    """Where the saliency map of one task goes: `<output name>_saliency_<task>.nii.gz`."""
    return Path(output_dir) / f"{output_name(case)}_saliency_{output_name(task)}.nii.gz"


def report_path(output_dir: str | os.PathLike, case: Mapping[str, Any]) -> Path:
    """Where the PNG report of a case goes: `<output name>_report.png`."""
    return Path(output_dir) / f"{output_name(case)}_report.png"


def case_outputs(output_dir: str | os.PathLike, case: Mapping[str, Any],
                 saliency_tasks: Sequence[str] = ()) -> list[Path]:
    """Every file a run writes for `case`; with `saliency_tasks`, the maps and the report too."""
    paths = [json_path(output_dir, case), mask_path(output_dir, case)]
    if saliency_tasks:
        paths += [saliency_path(output_dir, case, t) for t in saliency_tasks] + [report_path(output_dir, case)]
    return paths


def _looked_for() -> str:
    t1c = "|".join(PREFIXED["t1c"])
    t2w = "|".join(PREFIXED["t2w"])
    plain_t1c, plain_t2w = "|".join(PLAIN["t1c"]), "|".join(PLAIN["t2w"])
    return (f"<case>{{{t1c}}} + <case>{{{t2w}}} NIfTI pairs ({'/'.join(NIFTI)}) or <case>/{{{plain_t1c}}} + "
            f"<case>/{{{plain_t2w}}} folders")


def inference_cases(datalist: str | None = None, input_dir: str | None = None, split: str = "testing",
                    base_dir: str | None = None, strict: bool = False) -> list[dict]:
    """Cases to predict: every case found in `input_dir` if given, else the `split` list of a datalist JSON.

    No case found is an error saying what was looked for, where. Folders under `input_dir` whose
    NIfTI files form no case are listed in a warning, or (`strict`) refused."""
    if input_dir:
        if not Path(input_dir).is_dir():
            raise FileNotFoundError(f"input_dir {input_dir} is not a folder")
        cases = [{k: c[k] for k in ("case_id", "t1c", "t2w")} for c in find_cases(input_dir, strict)]
        if not cases:
            raise DatalistError("*", "input_dir", f"no case found under {input_dir}: looked for {_looked_for()}")
        return cases
    if datalist:
        if not Path(datalist).is_file():
            raise FileNotFoundError(f"datalist {datalist} not found (give --datalist JSON or --input_dir FOLDER)")
        raw = load_datalist(datalist, split, base_dir)
        if not raw:
            raise DatalistError("*", split, f"datalist {datalist} has no '{split}' cases to predict")
        bad = [i for i, c in enumerate(raw) if not isinstance(c, Mapping)]
        if bad:
            raise DatalistError(f"#{bad[0]}", "*", f"expected an object in {datalist}", split)
        return [{k: c[k] for k in ("case_id", *IMAGE_KEYS) if k in c} for c in raw]
    raise ValueError("give either `datalist` (a JSON with a 'testing' list) or `input_dir` (a folder of cases)")


def input_files(datalist: str | None = None, input_dir: str | None = None, base_dir: str | None = None) -> list[str]:
    """Every file an inference run must never write over: all files under `input_dir`, or every
    path of every split of the datalist (masks included) and the datalist itself."""
    if input_dir:
        return [str(p) for p in Path(input_dir).rglob("*") if p.is_file()]
    if not datalist or not Path(datalist).is_file():
        return []
    files = [str(datalist)]
    try:
        content = read_datalist(datalist)
    except ValueError:
        return files
    for split in SPLITS:
        if not isinstance(content.get(split), list):
            continue
        for case in load_datalist(content, split, base_dir or Path(datalist).parent):
            if isinstance(case, Mapping):
                files += [v for k, v in case.items() if isinstance(v, str) and (k in PATH_KEYS or os.sep in v)]
    return files


def _min_field_of_view(path: str) -> str | None:
    """Why the volume at `path` is too small to be a brain scan, or None. The voxel sizes are those of
    the affine the loader uses (not the header's pixdim, which may be 0)."""
    img = nib.load(path)
    shape = img.shape[:3]
    extent = [n * float(z) for n, z in zip(shape, voxel_sizes(img.affine))]
    few = [i for i, n in enumerate(shape) if n < MIN_SIDE_VOXELS]
    narrow = [i for i, e in enumerate(extent) if e < MIN_SIDE_MM]
    if few or narrow:
        why = (f"only {shape[few[0]]} voxels along axis {few[0]} (at least {MIN_SIDE_VOXELS})" if few else
               f"{extent[narrow[0]]:.0f} mm along axis {narrow[0]} (at least {MIN_SIDE_MM:.0f} mm)")
        return (f"too small for a brain volume: {why}; shape {tuple(shape)}, field of view "
                f"{' x '.join(f'{e:.0f}' for e in extent)} mm in {path}")
    return None


def same_image_problem(case: Mapping[str, Any]) -> str | None:
    """Why the T2W of `case` is not a scan of its own (the T1C file or its exact copy), or None."""
    t1c, t2w = nib.load(case["t1c"]), nib.load(case["t2w"])
    if os.path.realpath(case["t1c"]) == os.path.realpath(case["t2w"]) or (
            t1c.shape == t2w.shape and np.array_equal(np.asanyarray(t1c.dataobj), np.asanyarray(t2w.dataobj))):
        return f"the same image as the T1C (identical voxels): {case['t2w']} and {case['t1c']}"
    return None


def skull_problem(case: Mapping[str, Any]) -> str | None:
    """Why the T1C of `case` looks like a whole head rather than a skull-stripped brain, or None.

    The heuristic: the T1C foreground (after the chain's background shift and outlier clipping,
    the voxels the network's brain mask takes) is larger than ``MAX_BRAIN_ML``: a brain is
    1000-2000 mL, a head with its skull, scalp and neck 3000 mL or more. Brain extraction
    (``--preprocess true``) skips this check."""
    img = nib.load(case["t1c"])
    values = robust_intensity(np.asanyarray(img.dataobj).astype(np.float32))
    values = values[..., 0] if values.ndim == 4 else values
    volume_ml = float(brain_mask(values).sum()) * float(np.prod(voxel_sizes(img.affine))) / 1000.0
    if volume_ml > MAX_BRAIN_ML:
        return (f"looks like a whole head, not a skull-stripped brain: its foreground is {volume_ml:.0f} mL (a brain "
                f"is under {MAX_BRAIN_ML:.0f} mL); the model needs brain-extracted input, in {case['t1c']}")
    return None


class CaseCheck:
    """The per-case input check of an inference run: `good` cases go to the network, `errors`
    (case_id, field, file, problem) collect the bad ones, here and in the `PredictionWriter`.

    Besides the training's check: a minimum field of view, a T2W that is not the T1C again, and
    (unless `check_skull` is False, for input that brain extraction will strip) no whole head."""

    def __init__(self, cases: Sequence[Mapping[str, Any]], check_skull: bool = True) -> None:
        self.good: list[dict] = []
        self.errors: list[dict[str, str]] = []
        for case in cases:
            try:
                check_case(case, tasks=())
                for key in IMAGE_KEYS:
                    problem = _min_field_of_view(case[key])
                    if problem:
                        raise DatalistError(str(case["case_id"]), key, problem)
                for key, rule in (("t2w", same_image_problem), ("t1c", skull_problem if check_skull else None)):
                    problem = rule(case) if rule else None
                    if problem:
                        raise DatalistError(str(case["case_id"]), key, problem)
            except DatalistError as err:
                self.add(str(case.get("case_id", "?")), err.field, str(case.get(err.field, "")), err.problem)
                continue
            self.good.append(dict(case))

    def add(self, case_id: str, field: str, file: str, problem: str) -> None:
        self.errors.append({"case_id": case_id, "field": field, "file": file, "problem": problem})
        logger.error(f"case {case_id!r}, field {field!r}: {problem} -- no prediction for this case")


def prepare_output_dir(output_dir: str, cases: Sequence[Mapping[str, Any]], overwrite: bool = False,
                       inputs: Sequence[str] = (), input_dir: str | None = None,
                       saliency_tasks: Sequence[str] = ()) -> str:
    """Check every output path before anything is written; returns the folder, created.

    Refused (:class:`OutputExistsError`): an output folder inside `input_dir` (its masks would be
    found as ground truth later), two cases whose outputs share a name (also when they
    differ only in letter case), an output that is an input file (`inputs`, and every path in
    `cases`), an earlier run's results unless `overwrite`, and a file at an output path that no
    run of this bundle wrote. With `overwrite`, the earlier run's files (its manifest) are removed.
    `saliency_tasks` (``--saliency``): the saliency maps, reports and ``index.html`` are checked too."""
    out = Path(output_dir).resolve()
    protected = {Path(str(v)).resolve() for c in cases for k, v in c.items() if k != "case_id" and isinstance(v, str)}
    protected |= {Path(p).resolve() for p in inputs}
    owners: dict[str, str] = {}
    outputs = [p for c in cases for p in case_outputs(out, c, saliency_tasks)]
    outputs += [out / INDEX] if saliency_tasks else []  # what this run writes besides RUN_FILES
    for c in cases:
        if max(len(p.name.encode("utf-8")) for p in case_outputs("", c, saliency_tasks)) > MAX_NAME_BYTES:
            raise OutputExistsError(f"case {str(c['case_id'])[:60]!r}...: its output file name would be longer than "
                                    f"{MAX_NAME_BYTES} bytes; give it a shorter case_id")
        name = output_name(c).casefold()
        if name in owners:
            raise OutputExistsError(f"cases {owners[name]!r} and {c['case_id']!r} would write the same output files "
                                    f"({output_name(c)}.json); give each case a distinct case_id")
        owners[name] = str(c["case_id"])
    for target in [out / f for f in RUN_FILES] + outputs:
        if target.resolve() in protected:
            case = next((c["case_id"] for c in cases if target in case_outputs(out, c, saliency_tasks)), None)
            who = f"case {case!r}: output" if case is not None else "output"
            raise OutputExistsError(f"{who} {target} would overwrite an input file; choose another output_dir")
    folders = {Path(input_dir).resolve()} if input_dir else set()
    folders |= {Path(str(v)).resolve().parent for c in cases for k, v in c.items()
                if k in PATH_KEYS and isinstance(v, str)}
    folders |= {Path(p).resolve().parent for p in inputs if Path(p).suffix != ".json"}
    for folder in sorted(folders):
        if out == folder or folder in out.parents:
            what = f"input_dir {input_dir}" if input_dir and folder == Path(input_dir).resolve() else \
                f"the input folder {folder}"
            raise OutputExistsError(f"output_dir {out} lies inside {what}: the predicted masks (<case>_seg.nii.gz) "
                                    "would later be found as ground truth; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output_dir {out} is a file, not a folder")
    unfinished = _read_json(out / INCOMPLETE)
    if unfinished is not None:
        logger.warning(f"an earlier inference run into {out} did not finish (pid {unfinished.get('pid', '?')}, "
                       f"started {unfinished.get('started', '?')}): its outputs may be partial"
                       + ("; they are removed now (overwrite)" if overwrite else ""))
    written_before = read_manifest(out)
    previous = [p for p in (out / TABLE, out / ERRORS) if p.exists()] + ([out / MANIFEST] if written_before else [])
    if previous and not overwrite:
        died = " of a run that did not finish" if unfinished is not None else ""
        raise OutputExistsError(f"{out} holds an earlier run's results{died} ({previous[0].name}); "
                                "choose another output_dir or set overwrite=true")
    ours = {name for name, digest in written_before.items() if digest and file_hash(out / name) == digest}
    changed = sorted(name for name in written_before if name not in ours and (out / name).exists())
    for p in outputs:
        if p.exists() and p.name not in ours:
            why = ("was changed since an inference run of this bundle wrote it (e.g. corrected by hand)"
                   if p.name in written_before else "was not written by an inference run of this bundle "
                   f"(it is not in {MANIFEST})")
            hint = "move it away or choose another output_dir" if overwrite else \
                "choose another output_dir or set overwrite=true"
            if overwrite or p.name not in written_before:
                raise OutputExistsError(f"{p} {why}; this run would write over it: {hint}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".igreg_write_test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputExistsError(f"output_dir {out} cannot be written: {err}") from None
    acquire_lock(out, INFERENCE_LOCK, "inference run", "--output_dir")
    if overwrite:
        for name in ours | {p.name for p in previous if p.name != MANIFEST}:
            path = out / name
            if path.resolve() not in protected and path.parent == out:
                path.unlink(missing_ok=True)
        if changed:
            logger.warning(f"overwrite: kept {len(changed)} file(s) changed since this bundle wrote them: "
                           f"{', '.join(changed)}")
        write_manifest(out, {})
    (out / INCOMPLETE).write_text(json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    return str(out)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def file_hash(path: Path) -> str | None:
    """SHA-256 of a file's content, None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def read_manifest(out: Path) -> dict[str, str | None]:
    """{file name: SHA-256 of the content written} of the files the runs in `out` wrote (the folder's
    manifest; {} when there is none; None hashes from a manifest of bundles before 0.6.0)."""
    found = _read_json(out / MANIFEST)
    files = found.get("files") if isinstance(found, dict) else None
    if isinstance(files, list):
        files = dict.fromkeys(files)
    if not isinstance(files, dict):
        return {}
    return {n: (h if isinstance(h, str) else None) for n, h in files.items()
            if isinstance(n, str) and "/" not in n and os.sep not in n}


def write_manifest(out: Path, files: Mapping[str, str | None]) -> None:
    """Replace the manifest of `out` by `files` ({name: hash}, atomically)."""
    text = json.dumps({"files": dict(sorted(files.items()))}, indent=1) + "\n"
    atomic_write(out / MANIFEST, lambda p: p.write_text(text))


def add_to_manifest(out: Path, files: Mapping[str, str | None]) -> None:
    """Record `files` ({name: hash}) as written by this run, so that `--overwrite true` removes them later
    (as long as their content is unchanged)."""
    write_manifest(out, {**read_manifest(out), **files})


def write_output(path: Path, write: Any, size: int | None = None) -> None:
    """Write one output of an inference run: atomically (`atomic_write`), with its content hash recorded in
    the folder's manifest before it takes its name, so that a run that dies leaves every file it wrote
    listed. A full disk (or another OS error) raises :class:`OutputWriteError` naming the folder and the
    space needed (`size`, bytes, when known)."""
    def record_then_rename(tmp: Path) -> None:
        write(tmp)
        add_to_manifest(path.parent, {path.name: file_hash(tmp)})

    try:
        atomic_write(path, record_then_rename)
    except OSError as err:
        raise OutputWriteError.of(path, err, size) from None


class OutputWriteError(RuntimeError):
    """An output could not be written (e.g. the disk is full); the message names the folder and the space."""

    @classmethod
    def of(cls, path: Path, err: OSError, size: int | None = None) -> OutputWriteError:
        return cls(write_failure(path, err, size or 0))


def finish_run(out: Path) -> None:
    """Mark the run in `out` as finished: remove its incomplete-run marker and release its lock."""
    (out / INCOMPLETE).unlink(missing_ok=True)
    release_lock(out / INFERENCE_LOCK)


class SplitPredictiond(MapTransform):
    """Turn the network's dict output under `pred` into `pred` = segmentation logits and
    `probs` = {task: class probabilities}. With `temperatures` ({task: T}, the calibration stored in
    model.pt), a task's logits are divided by its T before the softmax, and `temperature` = {task: T}
    is added for the writer to report."""

    def __init__(self, keys: str = "pred", seg_key: str = "seg", temperatures: Mapping[str, float] | None = None
                 ) -> None:
        super().__init__(keys)
        self.seg_key = seg_key
        self.temperatures = {str(t): float(v) for t, v in (temperatures or {}).items()}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            out = d[key]
            temps = self.temperatures
            d["probs"] = {t: (v.float() / temps.get(t, 1.0)).softmax(-1) for t, v in out.items() if t != self.seg_key}
            d[key] = out[self.seg_key]
            if temps:
                d["temperature"] = {t: temps[t] for t in d["probs"] if t in temps}
        return d


def atomic_write(path: Path, write: Any) -> None:
    """`write(tmp)` to a hidden file beside `path`, then rename it to `path`: never a partial file."""
    tmp = path.with_name(f".tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}.{path.name}")  # keeps the extension nibabel reads
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_volume(path: Path, volume: Any, dtype: type) -> None:
    """A [1, *S] or [*S] volume with its affine (a MetaTensor's, else identity) as NIfTI of `dtype`,
    an output of the run (`write_output`: atomic, recorded in the manifest)."""
    data = np.asarray(torch.as_tensor(volume).detach().float().cpu().numpy())
    data = data[0] if data.ndim == 4 else data
    affine = np.asarray(torch.as_tensor(getattr(volume, "affine", torch.eye(4))).cpu().numpy(), np.float64)
    image = nib.Nifti1Image(data.astype(dtype), affine)
    write_output(path, lambda p: nib.save(image, str(p)), size=data.size * np.dtype(dtype).itemsize)


class PredictionWriter:
    """Per case: `<name>_seg.nii.gz` (the mask under `mask_key`, on the T1C file's grid, when
    present) and `<name>.json` (probability and class per task); `predictions.csv` for all.

    A case whose probabilities are not all finite gets no file and is added to `errors` (a
    :class:`CaseCheck`), which `finish_inference` reports."""

    def __init__(self, output_dir: str, tasks: Sequence[str], class_names: Mapping[str, Sequence[str]] | None = None,
                 filename: str = TABLE, errors: CaseCheck | None = None, mask_key: str | None = "pred") -> None:
        self.output_dir, self.tasks = Path(output_dir), list(tasks)
        self.class_names = dict(class_names or {})
        self.csv_path = self.output_dir / filename
        self.errors = errors
        self.mask_key = mask_key
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_cases)
        engine.add_event_handler(Events.COMPLETED, self.write_table)

    def _fail(self, case_id: str, problem: str) -> None:
        if self.errors is None:
            raise InferenceError(f"case {case_id!r}: {problem}")
        self.errors.add(case_id, "prediction", "", problem)

    def write_cases(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            case_id = str(item["case_id"])
            result: dict[str, Any] = {"case_id": case_id}
            probs = {t: torch.as_tensor(out["probs"][t]).detach().float().cpu() for t in self.tasks}
            bad = [t for t, p in probs.items() if not bool(torch.isfinite(p).all())]
            if bad:
                self._fail(case_id, f"probabilities not finite for {', '.join(bad)}; nothing written")
                continue
            temps = (out.get("temperature") if isinstance(out, Mapping) else None) or {}
            for task in self.tasks:
                cls = int(probs[task].argmax())
                names = self.class_names.get(task)
                result[task] = {"probabilities": [round(float(p), 6) for p in probs[task]], "class": cls,
                                **({"class_name": names[cls]} if names else {}),
                                "calibrated": task in temps, **({"temperature": float(temps[task])}
                                                                if task in temps else {})}
            if temps:  # probabilities of the temperature-scaled logits (docs/calibration.md); per task above
                result.update(calibrated=all(t in temps for t in self.tasks),
                              temperature={t: float(temps[t]) for t in self.tasks if t in temps})
            self.output_dir.mkdir(parents=True, exist_ok=True)
            mask = out.get(self.mask_key) if self.mask_key and isinstance(out, Mapping) else None
            text = strict_json(result)
            try:
                if mask is not None:
                    save_volume(mask_path(self.output_dir, item), mask, np.uint8)
                write_output(json_path(self.output_dir, item), lambda p: p.write_text(text), size=len(text))
            except OutputWriteError as err:  # e.g. a full disk: this case is reported, the run goes on
                self._fail(case_id, str(err))
                continue
            self.rows.append({"case_id": case_id,
                              **{f"{t}_prob": result[t]["probabilities"][-1] for t in self.tasks},
                              **{f"{t}_class": result[t]["class"] for t in self.tasks}})

    def write_table(self, engine: Engine) -> None:
        rows = [r for part in idist.all_gather(self.rows) for r in part] if idist.get_world_size() > 1 else self.rows
        if idist.get_rank() != 0 or not rows:
            return
        write_output(self.csv_path, lambda p: write_csv(p, sorted(rows, key=lambda r: r["case_id"])))
        logger.info(f"{len(rows)} predictions written to {self.output_dir}")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields or rows[0]))
        w.writeheader()
        w.writerows(rows)


def run_evaluator(evaluator: Engine, check: CaseCheck) -> None:
    """Run the evaluator over the good cases (none: nothing to run)."""
    if check.good:
        evaluator.run()


def finish_inference(output_dir: str, check: CaseCheck) -> None:
    """End the run: write `prediction_errors.csv` when some cases got no prediction, mark the run as
    finished (`finish_run`), and raise an :class:`InferenceError` naming the bad cases (so the
    command exits non-zero)."""
    out = Path(output_dir)
    if not check.errors:
        finish_run(out)
        return
    write_output(out / ERRORS, lambda p: write_csv(p, check.errors, ["case_id", "field", "file", "problem"]))
    finish_run(out)
    cases = list(dict.fromkeys(e["case_id"] for e in check.errors))
    done = len(check.good) - sum(e["field"] == "prediction" for e in check.errors)
    first = check.errors[0]
    raise InferenceError(f"{len(cases)} case(s) got no prediction: {', '.join(cases)} (first: case "
                         f"{first['case_id']!r}, field {first['field']!r}: {first['problem']}); "
                         f"{done} case(s) predicted; the list is in {out / ERRORS}")
