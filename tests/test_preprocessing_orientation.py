"""The network input must not depend on how a file stores the scan (issue "No lost files and no silent wrong
results", item 4): the same T2W (or T1C) stored RAS or LPS gives the same input, and resampling residue never
counts as brain, so the background stays exactly 0 after the z-scoring."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, SHARED_DATA, TINY_NET
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.utils import set_determinism

CONFIGS = BUNDLE / "configs"
TINY = {"network_def#" + k: list(v) if isinstance(v, tuple) else v for k, v in TINY_NET.items()}


def config_chain(name: str = "train", key: str = "train#preprocessing"):
    """The preprocessing chain as the bundle builds it (config + demo.yaml: 4 mm, 48^3)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f"{name}.yaml"), str(CONFIGS / "demo.yaml")])
    parser["bundle_root"] = str(BUNDLE)
    return parser.get_parsed_content(key)


def save(data: np.ndarray, affine: np.ndarray, path) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def small_case(tmp_path_factory) -> dict:
    """The BraTS case cropped around the brain at 2 mm (LPS as shipped), and its T1C/T2W stored RAS."""
    folder = SHARED_DATA / "brats2021_00000"
    if not folder.is_dir():
        pytest.skip("shared BraTS case not available")
    tmp = tmp_path_factory.mktemp("orient")
    crop = np.diag([2.0, 2.0, 2.0, 1.0])
    crop[:3, 3] = [30, 20, 0]
    files = {}
    for key, suffix in {"t1c": "t1ce", "t2w": "t2", "seg": "seg"}.items():
        img = nib.load(str(folder / f"BraTS2021_00000_{suffix}.nii.gz"))
        data = np.asanyarray(img.dataobj)[30:210:2, 20:230:2, 0:155:2]
        lps = nib.Nifti1Image(data, img.affine @ crop)
        assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
        ras = nib.as_closest_canonical(lps)  # the same scan, stored with both in-plane axes reversed
        assert nib.aff2axcodes(ras.affine) == ("R", "A", "S") and not np.array_equal(np.asanyarray(ras.dataobj), data)
        (tmp / "lps").mkdir(exist_ok=True)
        (tmp / "ras").mkdir(exist_ok=True)
        files[key] = save(data, lps.affine, tmp / "lps" / f"C_{suffix}.nii.gz")
        files[key + "_ras"] = save(np.asanyarray(ras.dataobj), ras.affine, tmp / "ras" / f"C_{suffix}.nii.gz")
    return files


def _assert_background_zero(image: torch.Tensor) -> None:
    background = image[0] == 0  # outside the T1C brain
    assert background.any() and int((~background).sum()) >= 50
    assert float(image[1][background].abs().max()) == 0.0
    brain = image[1][~background]
    assert abs(float(brain.mean())) < 1e-4 and abs(float(brain.std(unbiased=False)) - 1) < 1e-4


def test_defect4_t2w_orientation_does_not_change_input(small_case):
    chain = config_chain()
    lps = chain({"t1c": small_case["t1c"], "t2w": small_case["t2w"], "seg": small_case["seg"], "case_id": "c"})
    ras = chain({"t1c": small_case["t1c"], "t2w": small_case["t2w_ras"], "seg": small_case["seg"], "case_id": "c"})
    assert lps["image"].shape == (2, 48, 48, 48)
    torch.testing.assert_close(ras["image"].as_tensor(), lps["image"].as_tensor(), rtol=0, atol=1e-6)
    assert torch.equal(ras["seg"], lps["seg"])
    _assert_background_zero(lps["image"])
    _assert_background_zero(ras["image"])
    # the mask stored RAS too: the same target
    ras_seg = chain({"t1c": small_case["t1c"], "t2w": small_case["t2w"], "seg": small_case["seg_ras"]})
    assert torch.equal(ras_seg["seg"], lps["seg"])


def test_defect4_t1c_orientation_does_not_change_input(small_case):
    chain = config_chain("inference", "preprocessing")  # the inference spelling of the chain
    lps = chain({"t1c": small_case["t1c"], "t2w": small_case["t2w"]})
    ras = chain({"t1c": small_case["t1c_ras"], "t2w": small_case["t2w"]})
    both = chain({"t1c": small_case["t1c_ras"], "t2w": small_case["t2w_ras"]})
    for other in (ras, both):
        torch.testing.assert_close(other["image"].as_tensor(), lps["image"].as_tensor(), rtol=0, atol=1e-6)
        _assert_background_zero(other["image"])


@pytest.mark.parametrize("grid", ["flipped", "2mm_shifted"])
def test_defect4_background_stays_zero_when_t2w_needs_resampling(tmp_path, grid):
    """Synthetic (no shared data): a T2W that needs resampling leaves no nonzero background after z-scoring."""
    rng = np.random.default_rng(0)
    n = 40
    zz, yy, xx = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    brain = (xx - 19.5) ** 2 + (yy - 19.5) ** 2 + (zz - 19.5) ** 2 < 14**2
    t1 = np.where(brain, 500 + 100 * rng.random((n, n, n)), 0).astype(np.int16)
    t2 = np.where(brain, 700 + 150 * rng.random((n, n, n)), 0).astype(np.int16)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS, 1 mm
    affine[:3, 3] = [n - 1, n - 1, 0]
    t1c = save(t1, affine, tmp_path / "t1c.nii.gz")
    if grid == "flipped":  # the same grid stored RAS
        ras = nib.as_closest_canonical(nib.Nifti1Image(t2, affine))
        t2w = save(np.asanyarray(ras.dataobj), ras.affine, tmp_path / "t2w.nii.gz")
    else:  # 2 mm, origin shifted by 3 mm
        coarse = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
        coarse[:3, 3] += 3.0
        t2w = save(t2[1::2, 1::2, 1::2], coarse, tmp_path / "t2w.nii.gz")
    out = config_chain()({"t1c": t1c, "t2w": t2w})
    image = out["image"]
    assert image.shape == (2, 48, 48, 48)
    _assert_background_zero(image)
    if grid == "flipped":  # only the T1C decides what is brain: the same as the T2W on the T1C's own grid
        same = config_chain()({"t1c": t1c, "t2w": save(t2, affine, tmp_path / "t2w_same.nii.gz")})
        torch.testing.assert_close(image.as_tensor(), same["image"].as_tensor(), rtol=0, atol=1e-6)


def test_defect4_t2w_orientation_does_not_change_predictions(small_case, tmp_path):
    """End to end through inference.yaml (demo settings, a tiny random network): probabilities and mask agree."""
    set_determinism(seed=0)
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "inference.yaml"), str(CONFIGS / "demo.yaml")],
                        workflow_type="infer", bundle_root=str(BUNDLE), load_pretrain=False, **TINY)
    wf.initialize()
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    torch.save(wf.parser.get_parsed_content("network_def").state_dict(), ckpt / "model.pt")
    results = {}
    for name in ("lps", "ras"):
        folder = tmp_path / f"in_{name}"
        folder.mkdir()
        t2w = small_case["t2w" if name == "lps" else "t2w_ras"]
        (folder / "C_t1ce.nii.gz").symlink_to(small_case["t1c"])
        (folder / "C_t2.nii.gz").symlink_to(t2w)
        out = tmp_path / f"pred_{name}"
        wf = ConfigWorkflow(config_file=[str(CONFIGS / "inference.yaml"), str(CONFIGS / "demo.yaml")],
                            workflow_type="infer", bundle_root=str(BUNDLE), input_dir=str(folder),
                            ckpt_dir=str(ckpt), output_dir=str(out), num_workers=0, **TINY)
        wf.initialize()
        wf.run()
        results[name] = (json.loads(Path(out / "C.json").read_text()), nib.load(out / "C_seg.nii.gz"))
    (p_lps, m_lps), (p_ras, m_ras) = results["lps"], results["ras"]
    np.testing.assert_allclose(m_lps.affine, nib.load(small_case["t1c"]).affine, atol=1e-4)
    for task in ("1p19q", "idh", "grade"):
        np.testing.assert_allclose(p_ras[task]["probabilities"], p_lps[task]["probabilities"], atol=0.02)
        assert p_ras[task]["class"] == p_lps[task]["class"]
    a, b = np.asanyarray(m_lps.dataobj) > 0, np.asanyarray(m_ras.dataobj) > 0
    dice = 1.0 if not (a.any() or b.any()) else 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice >= 0.98
