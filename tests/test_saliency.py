"""Saliency at inference (``--saliency true``): maps on each T1C file's own grid, the report and the index
page, nothing without the flag, the overwrite manifest and the input checks covering the new files, and
maps that depend on the model's weights."""
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_NET
from scipy.stats import spearmanr
from test_inference_safety import brain, save, workflow

from scripts.inference import OutputExistsError, case_outputs, prepare_output_dir, report_path, saliency_path
from scripts.networks import IGRegNet
from scripts.saliency import SaliencyMaps, randomised_copy
from scripts.saliency.sanity import mass_share, rank_correlation
from scripts.saliency.transforms import SaliencyMapsd
from scripts.saliency.writer import SaliencyWriter

TASKS = ("1p19q", "idh", "grade")


def oblique_lps(spacing: float = 6.0, angle: float = 0.3) -> np.ndarray:
    """An LPS grid rotated by `angle` radians about the first axis, with an offset origin."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ np.diag([-spacing, -spacing, 5.0])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rot, [70.0, 80.0, -40.0]
    return affine


def cases(root: Path) -> list[dict]:
    """A RAS case `P1` and an oblique LPS case `site/P2` (T1C 24x24x20 with a bright block, 5 mm slices)."""
    t1c_p2 = brain(1, (24, 24, 20))
    t1c_p2[10:16, 10:16, 8:12] *= 3  # a bright "tumour"
    return [
        {"case_id": "P1", "t1c": save(root / "P1_t1c.nii.gz", brain(0)), "t2w": save(root / "P1_t2w.nii.gz", brain(2))},
        {"case_id": "site/P2", "t1c": save(root / "P2_t1c.nii.gz", t1c_p2, oblique_lps()),
         "t2w": save(root / "P2_t2w.nii.gz", brain(3, (24, 24, 20)), oblique_lps())},
    ]


def datalist(tmp_path: Path) -> str:
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"testing": cases(tmp_path / "in")}))
    return str(path)


@pytest.fixture(scope="module")
def saliency_run(tmp_path_factory):
    """One `--saliency true` run over both cases; returns (output folder, cases)."""
    tmp = tmp_path_factory.mktemp("saliency")
    dl = datalist(tmp)
    workflow(tmp, datalist=dl, output_dir=str(tmp / "out"), saliency="true").run()
    return tmp / "out", json.loads(Path(dl).read_text())["testing"]


def test_maps_lie_on_each_t1c_files_grid(saliency_run):
    out, listed = saliency_run
    for case in listed:
        t1c = nib.load(case["t1c"])
        mask = nib.load(out / f"{case['case_id'].replace('/', '%2F')}_seg.nii.gz")
        for task in TASKS:
            img = nib.load(saliency_path(out, case, task))
            assert img.shape == t1c.shape == mask.shape
            np.testing.assert_allclose(img.affine, t1c.affine, atol=1e-4)
            data = np.asarray(img.dataobj)
            assert data.dtype == np.float32 and np.isfinite(data).all()
            assert data.min() >= -1e-5 and 0.05 < data.max() <= 1.0 + 1e-5  # a map, not a mask or zeros


def test_saliency_run_writes_three_maps_a_report_and_the_index(saliency_run):
    out, listed = saliency_run
    manifest = set(json.loads((out / ".igreg_outputs.json").read_text())["files"])
    for case in listed:
        expected = case_outputs(out, case, TASKS)
        assert len(expected) == 2 + 3 + 1 and all(p.is_file() for p in expected)
        assert {p.name for p in expected} <= manifest
        png = report_path(out, case).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = (out / "index.html").read_text()
    assert "index.html" in manifest and page.count('<tr class="case"') == len(listed)
    assert 'src="site%252FP2_report.png"' in page  # the file is named site%2FP2_report.png: its URL escapes '%'


def test_no_saliency_work_or_files_without_the_flag(tmp_path):
    wf = workflow(tmp_path, datalist=datalist(tmp_path), output_dir=str(tmp_path / "out"))
    assert not any(isinstance(t, SaliencyMapsd) for t in wf.parser.get_parsed_content("postprocessing").flatten()
                   .transforms)
    evaluator = wf.parser.get_parsed_content("evaluator")
    handlers = [getattr(h[0], "__self__", None) for hs in evaluator._event_handlers.values() for h in hs]
    assert not any(isinstance(h, SaliencyWriter) for h in handlers)
    wf.run()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert not [n for n in names if "saliency" in n or n.endswith(".png") or n == "index.html"]
    assert len([n for n in names if n.endswith("_seg.nii.gz")]) == 2


def test_overwrite_removes_the_saliency_files_and_foreign_ones_are_refused(saliency_run, tmp_path):
    out, listed = saliency_run
    with pytest.raises(OutputExistsError, match="earlier run"):
        prepare_output_dir(str(out), listed, saliency_tasks=TASKS)
    prepare_output_dir(str(out), listed, overwrite=True)  # a run without --saliency replacing a saliency run
    assert not [p.name for p in out.iterdir() if "saliency" in p.name or p.suffix in (".png", ".html")]
    # a file at a saliency output path that no run wrote is refused, as a foreign mask would be
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    saliency_path(fresh, listed[0], "idh").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="not written by an inference run"):
        prepare_output_dir(str(fresh), listed, saliency_tasks=TASKS)
    prepare_output_dir(str(fresh), listed)  # without --saliency that file is not an output


def test_saliency_outputs_never_overwrite_inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "P1_report.png").write_bytes(b"")  # an input named like case P1's report
    case = {"case_id": "P1", "t1c": str(folder / "P1_report.png"), "t2w": save(folder / "P1_t2w.nii.gz", brain(1))}
    with pytest.raises(OutputExistsError, match="P1_report.png would overwrite an input"):
        prepare_output_dir(str(folder), [case], saliency_tasks=TASKS)
    case["t1c"] = save(folder / "P1_saliency_idh.nii.gz", brain(0))
    with pytest.raises(OutputExistsError, match="P1_saliency_idh.nii.gz would overwrite an input"):
        prepare_output_dir(str(folder), [case], saliency_tasks=TASKS)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "occlusion"])
def test_maps_follow_the_weights(method):
    torch.manual_seed(0)
    net = IGRegNet(tasks=TASKS, **TINY_NET).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    options = {"mask_size": 8, "overlap": 0.0, "n_batch": 8}
    maps, _, _ = SaliencyMaps(net, TASKS, method, occlusion=options)(x)
    again, _, _ = SaliencyMaps(net, TASKS, method, occlusion=options)(x)
    other, _, _ = SaliencyMaps(randomised_copy(net, seed=1), TASKS, method, occlusion=options)(x)
    for task in TASKS:
        assert maps[task].shape == (1, 1, 32, 32, 32) and float(maps[task].max()) == pytest.approx(1.0)
        assert torch.equal(maps[task], again[task])  # deterministic
        rho = spearmanr(maps[task].flatten().numpy(), other[task].flatten().numpy())[0]
        assert not rho > 0.9, f"{method} {task}: map barely changes when the weights are randomised (rho={rho:.2f})"
    assert all(p.requires_grad for p in net.parameters())  # the CAM's freezing is undone


def test_closing_removes_the_cam_hooks():
    net = IGRegNet(tasks=TASKS, **TINY_NET)
    maps = SaliencyMaps(net, TASKS)
    assert net.classifier.spatial._forward_hooks and net.classifier.spatial._backward_hooks
    maps.close()
    assert not net.classifier.spatial._forward_hooks and not net.classifier.spatial._backward_hooks


def test_randomising_only_the_heads_changes_the_cam():
    torch.manual_seed(0)
    net = IGRegNet(tasks=TASKS, **TINY_NET).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    heads_only = randomised_copy(net, seed=1, layers=["classifier.heads"])
    assert torch.equal(heads_only.encoder.stem[0].weight, net.encoder.stem[0].weight)
    a, _, _ = SaliencyMaps(net, TASKS)(x)
    b, _, _ = SaliencyMaps(heads_only, TASKS)(x)
    assert any(not torch.allclose(a[t], b[t], atol=1e-3) for t in TASKS)


def test_sanity_measures():
    brain_mask = np.ones((8, 8, 8))
    tumour = np.zeros((8, 8, 8))
    tumour[:2] = 1  # a quarter of the brain
    focused = tumour * 1.0 + 0.01
    mass, volume = mass_share(focused, tumour, brain_mask)
    assert volume == pytest.approx(0.25) and mass == pytest.approx(128 * 1.01 / (128 * 1.01 + 384 * 0.01))
    assert np.isnan(mass_share(np.zeros((8, 8, 8)), tumour, brain_mask)[0])  # no mass: undefined, not 0
    image_only = np.random.default_rng(0).uniform(size=(8, 8, 8))  # a "map" that ignores the model
    assert rank_correlation(image_only, image_only, brain_mask) == pytest.approx(1.0)
    assert abs(rank_correlation(image_only, np.random.default_rng(1).uniform(size=(8, 8, 8)), brain_mask)) < 0.2


def test_saliency_check_cli(tmp_path, capsys):
    from test_inference_safety import TINY, checkpoint

    from scripts.saliency_check import main

    root = tmp_path / "in"
    listed = cases(root)
    mask = np.zeros((24, 24, 24), np.uint8)
    mask[8:14, 8:14, 8:14] = 1
    listed[0]["seg"] = save(root / "P1_seg.nii.gz", mask)
    (tmp_path / "dl.json").write_text(json.dumps({"validation": listed}))
    model = tmp_path / "strategy" / "seed_3" / "models" / "model.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(checkpoint(tmp_path).read_bytes())
    main(str(model), datalist=str(tmp_path / "dl.json"), output=str(tmp_path / "check"), **TINY)
    with open(tmp_path / "check.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["group"], r["seed"], r["task"], r["cases"]) for r in rows] == [("strategy", "3", t, "1") for t in TASKS]
    for r in rows:
        assert 0 <= float(r["pass"]) <= 1 and 0.03 < float(r["volume"]) < 0.12  # 6^3 of 16^3 voxels, resampled
        assert float(r["rho_all"]) < 0.9  # the untrained tiny network's maps still follow its weights
    assert "| strategy | idh | 1 |" in capsys.readouterr().out


def test_bench_saliency_prints_one_json_line():
    import subprocess
    import sys

    from conftest import REPO

    command = [sys.executable, str(REPO / "benchmarks" / "bench_saliency.py"), "--tiny", "--cases", "1",
               "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cases"] == 1 and report["saliency_s_per_case"] > report["plain_s_per_case"] > 0
