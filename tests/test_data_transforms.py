"""Preprocessing on the real BraTS case (LPS, int16, 240x240x155), at a coarse size to stay fast."""
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from monai.transforms import Invertd

from scripts.data import augmentation, preprocessing
from scripts.data.loader import transform_hash

SIZE = (48, 48, 48)
PIXDIM = 4.0


@pytest.fixture(scope="module")
def brats_out():
    """The BraTS case's paths, the chain, and its output (run once for the module)."""
    folder = SHARED_DATA / "brats2021_00000"
    if not folder.is_dir():
        pytest.skip("shared BraTS case not available")
    names = {"t1c": "t1ce", "t2w": "t2", "seg": "seg"}
    case = {k: str(folder / f"BraTS2021_00000_{s}.nii.gz") for k, s in names.items()}
    chain = preprocessing(PIXDIM, SIZE)
    return case, chain, chain({**case, "case_id": "b0", "idh": 1})


def test_shape_orientation_labels(brats_out):
    _, _, out = brats_out
    assert sorted(out) == ["case_id", "has_seg", "image", "label", "seg"]
    assert out["image"].shape == (2, *SIZE) and out["image"].dtype == torch.float32
    assert out["seg"].shape == (1, *SIZE)
    assert nib.aff2axcodes(out["image"].affine.numpy()) == ("R", "A", "S")
    assert np.allclose(np.abs(np.diag(out["image"].affine.numpy())[:3]), PIXDIM)
    assert out["label"].tolist() == [-1, 1, -1] and bool(out["has_seg"]) and out["case_id"] == "b0"


def test_mask_is_binary_and_still_covers_the_tumor(brats_out):
    case, chain, out = brats_out
    seg = out["seg"]
    assert set(torch.unique(seg).tolist()) == {0.0, 1.0}
    tumor_mm3 = float((np.asanyarray(nib.load(case["seg"]).dataobj) > 0).sum())  # labels 1, 2, 4 at 1 mm
    assert abs(float(seg.sum()) * PIXDIM**3 / tumor_mm3 - 1.0) < 0.1
    # back on the original grid (MONAI meta kept for inversion), the mask overlaps the original one
    back = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=True)({**out, "pred": seg.clone()})
    pred = back["pred"][0].numpy() > 0.5
    truth = np.asanyarray(nib.load(case["seg"]).dataobj) > 0
    assert pred.shape == truth.shape == (240, 240, 155)
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.85


def test_brain_voxels_are_z_scored(brats_out):
    image = brats_out[2]["image"]
    for channel in image:
        brain = channel[channel != 0]
        assert abs(float(brain.mean())) < 1e-3 and abs(float(brain.std()) - 1) < 1e-2


def test_t2w_on_another_grid_is_resampled_onto_t1c(brats_out, tmp_path):
    case, chain, out = brats_out
    t2 = nib.load(case["t2w"])
    data = np.asanyarray(t2.dataobj)[20:220:2, ::-2, 5:150:2]  # cropped, 2 mm, second axis reversed
    affine = t2.affine @ np.array([[2, 0, 0, 20], [0, -2, 0, 239], [0, 0, 2, 5], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "t2_other.nii.gz"))
    other = chain({"t1c": case["t1c"], "t2w": str(tmp_path / "t2_other.nii.gz")})
    assert torch.equal(other["image"][0], out["image"][0]) and not bool(other["has_seg"])
    assert float(other["seg"].abs().sum()) == 0
    a, b = out["image"][1].flatten(), other["image"][1].flatten()
    brain = (a != 0) & (b != 0)
    assert brain.float().mean() > 0.2 and np.corrcoef(a[brain], b[brain])[0, 1] > 0.85


def test_inference_chain_has_no_targets_and_augmentation_keeps_pairs(brats_out):
    case = brats_out[0]
    out = preprocessing(PIXDIM, SIZE, tasks=None)({"t1c": case["t1c"], "t2w": case["t2w"]})
    assert sorted(out) == ["image"] and out["image"].shape == (2, *SIZE)
    row = {"image": brats_out[2]["image"].as_tensor(), "seg": brats_out[2]["seg"].as_tensor()}
    aug = augmentation(flip_axes=(0, 1, 2), flip_prob=1.0, affine_prob=0.0, intensity_prob=0.0)
    flipped = aug(row)
    assert torch.equal(flipped["seg"], row["seg"].flip(1, 2, 3))
    assert torch.equal(flipped["image"], row["image"].flip(1, 2, 3))


def test_disk_cache_names_follow_the_settings_not_the_readers_state(brats_out):
    used = brats_out[1]  # has read files: its loader's reader objects changed state
    assert transform_hash(used.transforms) == transform_hash(preprocessing(PIXDIM, SIZE).transforms)
    assert transform_hash(used.transforms) != transform_hash(preprocessing(PIXDIM, (64, 48, 48)).transforms)
