"""benchmarks/bench_reference.py: one JSON line with the reference's and the bundle's step times."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

REFERENCE = REPO.parent / "shared" / "reference" / "IGReg" / "IGReg"


@pytest.mark.skipif(not (REFERENCE / "model" / "IGReg.py").is_file(),
                    reason="the reference code is not beside the repository (../shared/reference/IGReg/IGReg)")
def test_bench_reference_prints_one_json_report():
    command = [sys.executable, str(REPO / "benchmarks" / "bench_reference.py"), "--size", "32", "32", "32",
               "--repeats", "1", "--warmup", "0", "--threads", "1", "--tiny_bundle"]
    report = json.loads(subprocess.run(command, stdout=subprocess.PIPE, check=True, text=True).stdout)
    assert report["size"] == [32, 32, 32] and report["threads"] == 1
    for name in ("reference_igreg", "reference_plain", "bundle_igreg", "bundle_plain"):
        assert report[f"{name}_s"] > 0 and len(report[f"{name}_times_s"]) == 1
        assert report[f"{name}_peak_mib"] > 100
    assert report["reference_igreg_s"] > report["reference_plain_s"]  # 2 surrogate steps + main step vs one step
    assert report["reference_ratio"] == pytest.approx(report["reference_igreg_s"] / report["reference_plain_s"],
                                                      rel=0.02)
