"""benchmarks/: the step benchmark's report and the memory estimate's tensor accounting."""

import argparse
import gc
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_step import FlopCounter, data_child  # noqa: E402
from cohort_cues import split_auc  # noqa: E402
from memory_estimate import CudaAutocastPolicy, LiveTensorBytes, fit_line  # noqa: E402

from scripts.data import generate_cohort, load_datalist, write_datalist  # noqa: E402


def test_bench_step_prints_one_json_report():
    command = [sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--tiny", "--size", "32", "32", "32",
               "--repeats", "2", "--warmup", "0", "--threads", "1", "--skip_data", "--parts", "--flops",
               "--surrogate_steps", "1"]
    report = json.loads(subprocess.run(command, stdout=subprocess.PIPE, check=True, text=True).stdout)
    assert report["size"] == [32, 32, 32] and report["device"] == "cpu" and report["threads"] == 1
    assert report["surrogate_steps"] == 1                      # the option reaches the strategy
    assert report["igreg_s"] > 0 and report["plain_s"] > 0 and report["skipped"] == []
    assert report["ratio"] == pytest.approx(report["igreg_s"] / report["plain_s"], rel=0.02)   # inputs rounded
    assert report["mem_ratio"] == pytest.approx(report["igreg_peak_mib"] / report["plain_peak_mib"], rel=0.02)
    assert report["plain_peak_mib"] > 100                      # a whole process with torch loaded
    assert len(report["igreg_times_s"]) == 2 and sorted(report["igreg_times_s"])[0] <= report["igreg_s"]
    assert {"forward", "surrogate_updates", "main_backward_step", "guard"} <= set(report["igreg_parts_s"])
    assert "surrogate_updates" not in report["plain_parts_s"]
    assert set(report["igreg_parts_cpu_s"]) == set(report["igreg_parts_s"])
    assert 0 < report["igreg_parts_cpu_s"]["surrogate_updates"] <= report["igreg_cpu_s"] * 1.01
    inner = report["igreg_parts_s"]["surrogate_task_gradients"] + report["igreg_parts_s"]["surrogate_projection_lion"]
    assert 0 < inner <= report["igreg_parts_s"]["surrogate_updates"] * 1.01     # parts of the surrogate updates
    assert "batch_s" not in report
    assert report["flop_ratio"] == pytest.approx(report["igreg_gflop"] / report["plain_gflop"], rel=0.02)
    plain, igreg = report["plain_gflop_parts"], report["igreg_gflop_parts"]
    assert set(plain) == {"forward", "main_backward_step"} and plain["main_backward_step"] > plain["forward"]
    assert igreg["forward"] >= plain["forward"] and igreg["surrogate_task_gradients"] > 0   # the extra decoded row
    assert igreg["surrogate_batches_encoder"] > 0 and report["flop_ratio"] > 1


def test_flop_counter_counts_a_convolution_and_its_backward_in_the_running_part():
    conv = torch.nn.Conv3d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    part = ["forward"]
    with FlopCounter(lambda: part[0]) as counter:
        y = conv(x)
        part[0] = "backward"
        y.sum().backward()
    forward = 2 * 2 * 4 * 3 * 27 * 8 ** 3                      # multiply-adds of every output voxel
    assert counter.flops == {"forward": forward, "backward": 2 * forward}   # input and weight gradients


def test_data_child_times_the_demo_loader_and_step(tmp_path):
    generate_cohort(tmp_path, seed=0, n_train_cls=12, n_train_seg=4, n_val=2, n_test=1, spacing=8.0)
    args = argparse.Namespace(device="cpu", amp=False, tiny=True, demo_dir=str(tmp_path), warmup=0, repeats=1)
    out = data_child(args)
    assert out["cache"] == "memory" and out["spatial_size"] == [48, 48, 48] and out["strategy"] == "igreg"
    assert out["batch_s"] > 0 and out["step_s"] > 0 and out["cache_s"] > 0


def test_live_tensor_bytes_counts_storages_until_freed():
    with LiveTensorBytes() as live:
        x = torch.empty(1000)
        view, y = x.view(10, 100), x + 1
        assert live.now == 8000
        del x, y
        gc.collect()
        assert live.now == 4000                              # the view keeps x's storage
        del view
        gc.collect()
        assert live.now == 0 and live.peak == 8000


def test_cuda_autocast_policy_casts_like_cuda():
    conv, norm, act = torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.PReLU()
    with CudaAutocastPolicy():
        a = conv(torch.randn(1, 2, 4, 4, 4))
        b = norm(a)
        c = act(b)
        d = torch.softmax(c, 1)
        e = F.interpolate(c, scale_factor=2.0, mode="trilinear")
    expected = (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16)
    assert (a.dtype, b.dtype, c.dtype, d.dtype, e.dtype) == expected
    d.sum().backward()
    assert conv.weight.grad.dtype == torch.float32


def test_fit_line():
    assert fit_line([1, 2, 3], [3, 5, 7]) == (1.0, 2.0)


def test_cohort_cues_rank_cases_by_their_phenotype(tmp_path):
    """Each feature separates a cohort built to differ only in that task's cue; a case whose T2W lies
    on another grid is left out."""
    rng = np.random.default_rng(0)
    cases = []
    for i, (grade, idh, codel) in enumerate([(0, 0, 0), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1)]):
        t1c = np.ones((8, 8, 8), np.float32)
        t1c[:2 + 2 * grade, :4] = 1.0 + grade                        # enhancement only when high grade
        seg = np.zeros((8, 8, 8), np.uint8)
        seg[4:, 4:, 4:] = 1
        t2w = np.ones((8, 8, 8), np.float32)
        t2w[4:, 4:, 4:] = (1.2 + idh) * (1 + (0.4 if codel else 0.02) * rng.standard_normal((4, 4, 4)))
        if i == 4:
            t2w = t2w[:, :, :6]                                       # a T2W on its own grid
        for name, data in (("t1c", t1c), ("t2w", t2w), ("seg", seg)):
            nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"c{i}_{name}.nii.gz")
        cases.append({"case_id": f"c{i}", **{k: f"c{i}_{k}.nii.gz" for k in ("t1c", "t2w", "seg")},
                      "grade": grade, "idh": idh, "1p19q": codel})
    cases.append({"case_id": "no_mask", "t1c": "c0_t1c.nii.gz", "t2w": "c0_t2w.nii.gz", "grade": 1})
    write_datalist(tmp_path / "datalist.json", {"validation": cases})
    report = split_auc(load_datalist(tmp_path / "datalist.json", "validation"))
    assert report["cases_with_mask"] == 4
    for task in ("grade", "idh", "1p19q"):
        assert report[task] == {"cases": 4, "roc_auc": 1.0}
