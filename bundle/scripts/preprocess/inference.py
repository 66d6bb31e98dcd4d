"""Inference on raw scans (``--preprocess true`` in configs/inference.yaml): each case goes through the chain
into ``<output_dir>/preprocessed/``, the network sees the prepared case, and its mask goes back onto the raw
T1C's grid through the inverse of the T1C -> atlas transform."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import ants
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.data.validate import DatalistError
from scripts.inference import CaseCheck, inference_cases

from .io import ras_affine, read_image, to_ants
from .resample import to_raw_grid
from .workflow import Chain, case_folder, prepare_cases, prepare_output_dir

RAW_T1C, TO_ATLAS = "raw_t1c", "t1c_to_atlas"  # keys a prepared case carries for the way back


def raw_cases(input_dir: str | None = None, datalist: str | None = None) -> list[dict]:
    """The raw cases to predict: found under `input_dir` as the preprocessing finds them (NIfTI files or DICOM
    series folders; image files that form no case are refused), else the datalist's ``testing`` list."""
    if not input_dir:
        return inference_cases(datalist=datalist)
    from .workflow import gather_cases

    cases, unclaimed = gather_cases(input_dir)
    if unclaimed:
        raise DatalistError("*", "input_dir", f"image files in {unclaimed[0]} form no case (T1C + T2W expected, "
                            "see docs/preprocessing.md); move them out of input_dir or name them as a case")
    return [{k: c[k] for k in ("case_id", "t1c", "t2w")} for c in cases]


class PreparedCaseCheck(CaseCheck):
    """`CaseCheck` of the prepared cases: the raw cases are prepared first (finished ones are reused unless
    `overwrite`); a case the chain fails on gets no prediction and is listed with the others."""

    def __init__(self, cases: Sequence[Mapping[str, Any]], prepared_dir: str, chain: Chain,
                 overwrite: bool = False, num_workers: int = 1) -> None:
        out = prepare_output_dir(prepared_dir, cases, overwrite=overwrite)
        rows, errors = prepare_cases(cases, out, chain, num_workers)
        done = {r["case_id"] for r in rows}
        prepared = [{"case_id": c["case_id"], "t1c": str(case_folder(out, c) / "t1c.nii.gz"),
                     "t2w": str(case_folder(out, c) / "t2w.nii.gz"), RAW_T1C: str(c["t1c"]),
                     TO_ATLAS: str(case_folder(out, c) / "t1c_to_atlas.mat")} for c in cases if c["case_id"] in done]
        super().__init__(prepared)
        for error in errors:
            self.add(error["case_id"], error["field"], error["file"], error["problem"])


class RawGridd(MapTransform):
    """Map `keys` (masks on the prepared T1C's grid) onto the raw T1C's grid (nearest), for cases that carry
    ``raw_t1c`` and ``t1c_to_atlas``; other cases pass unchanged."""

    def __init__(self, keys: str | Sequence[str] = "pred") -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if not d.get(RAW_T1C) or not d.get(TO_ATLAS):
            return d
        prepared_t1c = Path(str(d[TO_ATLAS])).with_name("t1c.nii.gz")
        grid = ants.image_read(str(prepared_t1c))
        raw = to_ants(read_image(d[RAW_T1C]))
        for key in self.key_iterator(d):
            mask = torch.as_tensor(d[key]).detach().float().cpu().numpy()
            moved = to_raw_grid(grid.new_image_like(mask[0].astype(np.float32)), raw, Path(str(d[TO_ATLAS])))
            d[key] = MetaTensor(torch.from_numpy(moved.numpy()[None].astype(np.float32)),
                                affine=torch.as_tensor(ras_affine(raw)))
        return d
