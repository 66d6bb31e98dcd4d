"""Reading a scan: a NIfTI file or a DICOM series folder, as a SimpleITK image and as an ANTs image."""
from __future__ import annotations

import locale
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ants
import numpy as np
import SimpleITK as sitk

NIFTI = (".nii.gz", ".nii")


def is_nifti(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and str(path).lower().endswith(NIFTI)


@contextmanager
def keep_locale() -> Iterator[None]:
    """Restore the process's locale afterwards: SimpleITK's DICOM (GDCM) input and output set it to "C", after
    which Python reads text files as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def dicom_series(folder: str | os.PathLike) -> list[str]:
    """The DICOM series ids in `folder` (not below it); [] when it holds none."""
    if not Path(folder).is_dir():
        return []
    with keep_locale():
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def read_image(path: str | os.PathLike) -> sitk.Image:
    """A 3-D scan as float32: a NIfTI file, or a folder holding one DICOM series (read with SimpleITK's
    `ImageSeriesReader`, slices ordered by position). A folder of several series is refused, by name."""
    path = Path(path)
    if path.is_dir():
        series = dicom_series(path)
        if not series:
            raise ValueError(f"no DICOM series in folder {path}")
        if len(series) > 1:
            raise ValueError(f"{len(series)} DICOM series in folder {path} ({', '.join(series[:3])}...); "
                             "give each series a folder of its own or name the files in a cases CSV")
        with keep_locale():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
    elif path.is_file():
        with keep_locale():  # a single DICOM file goes through GDCM too
            image = sitk.ReadImage(str(path))
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D scan, got {image.GetDimension()}-D of size {image.GetSize()} in {path}")
    return sitk.Cast(image, sitk.sitkFloat32)


def to_ants(image: sitk.Image) -> ants.ANTsImage:
    """The same voxels and physical placement as an ANTs image."""
    return ants.from_sitk(image)


def ras_affine(image: ants.ANTsImage) -> np.ndarray:
    """The voxel-to-RAS affine of an ANTs (LPS) image, as NIfTI stores it."""
    direction = np.asarray(image.direction).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.spacing)[None, :]
    affine[:3, 3] = image.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def write_image(image: ants.ANTsImage, path: str | os.PathLike, dtype: type = np.float32) -> None:
    """`image` as NIfTI of `dtype` at `path` (the caller makes the write atomic)."""
    import nibabel as nib

    data = image.numpy().astype(dtype)
    nib.save(nib.Nifti1Image(data, ras_affine(image)), str(path))
