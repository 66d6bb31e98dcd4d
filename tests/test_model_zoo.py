"""The checks the MONAI model zoo's CI runs on a bundle, on tiny settings: each workflow through
ConfigWorkflow with the default ids (initialize, check_properties, run, finalize), the metadata against
the 20240725 schema (vendored: tests/schema), the network's inputs and outputs against the metadata, and
the TorchScript export."""
import json
import socket
from pathlib import Path

import ignite.distributed as idist
import pytest
import test_bundle
import torch
from conftest import BUNDLE
from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
from test_bundle import TINY, configs

from scripts.checkpoint import CheckpointError
from scripts.errors import bundle_error

META = BUNDLE / "configs" / "metadata.json"
SCHEMA = Path(__file__).parent / "schema" / "meta_schema_20240725.json"
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
HEADS = ("seg", "1p19q", "idh", "grade")
cohort = test_bundle.cohort  # test_bundle's tiny cohort (fixture)


def check_workflow(wf: ConfigWorkflow) -> ConfigWorkflow:
    """What the model zoo does with a bundle's workflow."""
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    return wf


def tiny_run(cohort: Path, run: Path) -> dict:
    return {"bundle_root": str(BUNDLE), "dataset_dir": str(cohort), "output_dir": str(run / "eval"),
            "ckpt_dir": str(run / "models"), **TINY}


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> Path:
    """`run` (the model zoo's default id) of train.yaml: one epoch of two iterations; returns ckpt_dir."""
    run = tmp_path_factory.mktemp("zoo_train")
    wf = check_workflow(ConfigWorkflow(config_file=configs("train", "demo"), workflow_type="train",
                                       epochs=1, iters_per_epoch=2, **tiny_run(cohort, run)))
    assert wf.parser["run"] == "@training"
    assert torch.load(run / "models" / "training_state.pt", weights_only=True)["iteration"] == 2
    return run / "models"


def test_train_seeds_before_building_the_network(cohort, tmp_path):
    """Whatever builds the components first (check_properties here), the network is the seeded one."""
    nets = []
    for check in (True, False):
        wf = ConfigWorkflow(config_file=configs("train", "demo"), workflow_type="train", **tiny_run(cohort, tmp_path))
        wf.initialize()
        if check:
            assert wf.check_properties() == []
        nets.append(wf.parser.get_parsed_content("network").state_dict())
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])


def test_train_load_pretrain_starts_from_ckpt_path(trained, cohort, tmp_path):
    run = {**tiny_run(cohort, tmp_path), "load_pretrain": "true", "ckpt_path": str(trained / "model.pt")}
    wf = ConfigWorkflow(config_file=configs("train", "demo"), workflow_type="train", **run)
    wf.initialize()
    saved = torch.load(trained / "model.pt", weights_only=True)
    net = wf.parser.get_parsed_content("network").state_dict()
    assert all(torch.equal(net[k], saved[k]) for k in saved)
    wf = ConfigWorkflow(config_file=configs("train", "demo"), workflow_type="train",
                        **{**run, "network_def#pooling": "avg"})
    with pytest.raises(Exception) as err:   # the settings check of scripts.checkpoint, before anything runs
        wf.initialize()
    assert isinstance(bundle_error(err.value), CheckpointError)
    assert 'network_def#pooling: checkpoint "max" vs this run "avg"' in str(bundle_error(err.value))


def test_multi_gpu_train_as_one_gloo_rank(cohort, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    wf = ConfigWorkflow(config_file=configs("train", "multi_gpu_train", "demo"), workflow_type="train",
                        epochs=1, iters_per_epoch=1, **tiny_run(cohort, tmp_path))
    try:
        check_workflow(wf)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        idist.sync(temporary=True)  # Ignite back to one process for the tests that follow
    assert (tmp_path / "models" / "model.pt").is_file()


def test_evaluate(trained, cohort, tmp_path):
    wf = check_workflow(ConfigWorkflow(config_file=configs("train", "evaluate", "demo"), workflow_type="eval",
                                       val_split="testing", **{**tiny_run(cohort, tmp_path),
                                                               "ckpt_dir": str(trained)}))
    assert wf.parser["run"] == "@evaluating"
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(report["tasks"]) == {"1p19q", "idh", "grade"}
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    assert set(json.loads(META.read_text())["eval_metrics"]) <= set(metrics)  # the keys metadata.json reports


def test_infer(trained, cohort, tmp_path):
    check_workflow(ConfigWorkflow(config_file=configs("inference", "demo"), workflow_type="infer",
                                  **{**tiny_run(cohort, tmp_path), "output_dir": str(tmp_path / "pred"),
                                     "ckpt_dir": str(trained)}))
    testing = json.loads((cohort / "datalist.json").read_text())["testing"]
    assert all((tmp_path / "pred" / f"{c['case_id']}.json").is_file() for c in testing)


def test_evaluators_autocast_to_the_training_dtype(cohort, tmp_path):
    for names, evaluator in ((("train", "demo"), "validate#evaluator"), (("inference", "demo"), "evaluator")):
        wf = ConfigWorkflow(config_file=configs(*names), workflow_type=None, load_pretrain=False,
                            **tiny_run(cohort, tmp_path))
        wf.initialize()
        assert wf.parser.get_parsed_content(f"{evaluator}#amp_kwargs") == {"dtype": torch.bfloat16}


def test_verify_metadata():
    # the vendored schema (MONAI-extra-test-data 0.8.1, unchanged): nothing is downloaded
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)
    meta = json.loads(META.read_text())
    assert meta["schema"].endswith("/meta_schema_20240725.json")
    assert set(meta["network_data_format"]["outputs"]) == set(HEADS)
    assert {"nilearn", "scipy", "nibabel", "pytorch-ignite", "lion-pytorch"} <= set(meta["required_packages_version"])


@pytest.mark.parametrize("head", HEADS)
def test_verify_net_in_out(head):
    """MONAI checks the one output the metadata calls `pred`: each head in turn, the network wrapped to return it."""
    outputs = json.loads(META.read_text())["network_data_format"]["outputs"]
    verify_net_in_out(net_id="head_net", meta_file=str(META), config_file=configs("inference", "demo"), n=2,
                      **{"head_net": {"_target_": "scripts.networks.HeadOutput", "network": "@network_def",
                                      "head": head},
                         "_meta_#network_data_format#outputs#pred": outputs[head], **TINY})


def test_ckpt_export(trained, tmp_path):
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(trained / "model.pt"), meta_file=str(META),
                config_file=configs("inference", "demo"), bundle_root=str(BUNDLE), **TINY)
    scripted = torch.jit.load(str(ts))
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        out = scripted(x)
    assert set(out) == set(HEADS) and out["seg"].shape == (1, 2, 32, 32, 32) and out["idh"].shape == (1, 2)
