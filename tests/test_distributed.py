"""Distributed training on CPU with gloo: the rank helpers in two spawned processes, and a
two-process torchrun run of configs/multi_gpu_train.yaml on a tiny generated cohort."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ignite.distributed as idist
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import BUNDLE, TINY_NET
from ignite.engine import Engine
from monai.bundle import ConfigWorkflow
from torch import nn

import scripts.checkpoint  # noqa: F401  (evaluate.yaml calls it without importing it)
from scripts.data import generate_cohort
from scripts.diagnostics import conflict_stats
from scripts.distributed import average_across_ranks, broadcast_module, sync_buffers
from scripts.metrics import MultiTaskMetric
from scripts.mtl.base import non_finite_names, share_gradients

CONFIGS = BUNDLE / "configs"
TINY = {"pixdim": [8.0, 8.0, 8.0], "spatial_size": [32, 32, 32], "num_workers": 0, "cache": "none",
        **{f"network_def#{k}": list(v) if isinstance(v, tuple) else v for k, v in TINY_NET.items()}}
# written by each rank after training: its whole state, what it validated and what it drew from
PROBE = ("$torch.save({'pid': os.getpid(), 'strategy': @strategy.state_dict(),"
         " 'optimizers': [o.state_dict() for o in @strategy.optimizers],"
         " 'report': @validate#evaluator.state.metric_details['report'], 'val_cases': len(@validate#sampler),"
         " 'streams': @train#dataloader.sampler.streams}, @probe_dir + '/rank' + str(@rank) + '.pt')")


# ---- the helpers, two processes -----------------------------------------------------------------
def _metric_batches():
    """Three validation cases: two on rank 0 (one with a mask), one without a mask on rank 1."""
    gen = torch.Generator().manual_seed(0)
    seg = torch.zeros(3, 1, 4, 4, 4)
    seg[0, :, :2] = 1
    logits = torch.randn(3, 2, 4, 4, 4, generator=gen)
    batch = {"pred": {t: torch.randn(3, 2, generator=gen) for t in ("a", "b")} | {"seg": logits},
             "label": {"label": torch.tensor([[1, 0], [0, -1], [1, 1]]), "seg": seg,
                       "has_seg": torch.tensor([True, False, False])}}
    return batch, [slice(0, 2), slice(2, 3)]


def _evaluate(batches):
    engine = Engine(lambda e, b: b)
    engine.state.metric_details = {}
    MultiTaskMetric(["a", "b"], output_transform=lambda out: (out["pred"], out["label"])).attach(engine, "score")
    engine.run(batches, max_epochs=1)
    return engine.state.metric_details["report"]


def _worker(rank: int, folder: str) -> None:
    batch, shards = _metric_batches()
    single = _evaluate([batch])  # before the process group: one process sees all cases
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        # gradients: averaged; one used on rank 0 only is halved; one unused everywhere keeps none
        params = [nn.Parameter(torch.zeros(2)) for _ in range(3)]
        params[0].grad = torch.full((2,), rank + 1.0)
        if rank == 0:
            params[1].grad = torch.full((2,), 2.0)
        grads, checks = share_gradients(params, {"loss": torch.tensor(1.0)})
        assert params[0].grad.tolist() == [1.5, 1.5] and params[1].grad.tolist() == [1.0, 1.0]
        assert params[2].grad is None and len(grads) == 2 and non_finite_names(checks, grads) == []
        # a loss that is not finite on rank 1 only: both ranks skip
        terms = {"loss": torch.tensor(float("nan") if rank else 1.0)}
        params[0].grad = torch.ones(2)
        grads, checks = share_gradients(params, terms)
        assert "any_rank" in non_finite_names(checks, grads)
        # a module's parameters and buffers (bool included) from rank 0; BatchNorm statistics averaged
        bn = nn.BatchNorm1d(2)
        bn.weight.data.fill_(rank + 3.0)
        bn.register_buffer("flag", torch.tensor(rank == 0))
        broadcast_module(bn)
        assert bn.weight.tolist() == [3.0, 3.0] and bool(bn.flag)
        # channels-last weights, also those both contiguous and channels-last (1x1x1) and non-contiguous ones
        convs = nn.Sequential(nn.Conv3d(4, 4, 1), nn.Conv3d(4, 4, 3)).to(memory_format=torch.channels_last_3d)
        for conv in convs:
            conv.weight.data.fill_(rank + 3.0)
        broadcast_module(convs)
        assert all(bool((conv.weight == 3.0).all()) for conv in convs)
        assert not convs[1].weight.is_contiguous()
        bn.running_mean.fill_(rank)
        bn.num_batches_tracked.fill_(7 + rank)
        sync_buffers(bn)
        assert bn.running_mean.tolist() == [0.5, 0.5] and int(bn.num_batches_tracked) == 7
        # task gradients opposed on average, though not on rank 0: every rank reports the global conflict
        grads = torch.tensor([[1.0, 0.0], [1.0, 1.0]] if rank == 0 else [[1.0, 0.0], [-3.0, -1.0]])
        assert conflict_stats(grads, ["a", "b"]).conflict_fraction == (0.0 if rank == 0 else 1.0)
        average_across_ranks([grads])
        assert conflict_stats(grads, ["a", "b"]).conflict_fraction == 1.0
        # rank 0 first (as multi_gpu_train.yaml's prepare_cohort): rank 1 finds what rank 0 created
        marker = Path(folder) / "made_by_rank_0"

        def make_marker() -> bool:
            existed = marker.exists()
            marker.touch()
            return existed
        assert idist.one_rank_first()(make_marker)() == (rank == 1)
        # validation metrics of unequal shards, one without any mask, equal those of one process
        shard = {"pred": {k: v[shards[rank]] for k, v in batch["pred"].items()},
                 "label": {k: v[shards[rank]] for k, v in batch["label"].items()}}
        report = _evaluate([shard])
        assert _same(report, single) and report["dice_cases"] == 1 and report["tasks"]["a"]["n"] == 3
    finally:
        dist.destroy_process_group()


def test_rank_helpers_in_two_processes(tmp_path):
    # forked: the children start with this module's imports (the parent holds no process group)
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=2, start_method="fork")


# ---- the bundle under torchrun --------------------------------------------------------------------
def test_multi_gpu_config_keeps_the_training_steps():
    """multi_gpu_train.yaml keeps train.yaml's `training`/`run` lists (it overrides only what differs) and
    its `initialize` runs train.yaml's, in order, after setting up the process group."""
    train = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    multi = yaml.safe_load((CONFIGS / "multi_gpu_train.yaml").read_text())
    assert "training" not in multi and "run" not in multi and train["run"] == "@training"
    assert multi["initialize"][-len(train["initialize"]):] == train["initialize"]
    assert any("init_process_group" in s for s in multi["initialize"][:-len(train["initialize"])])
    assert "idist.one_rank_first()(scripts.data.ensure_demo_cohort)(folder)" in multi["prepare_cohort"]
    assert "$import ignite.distributed as idist" in multi["initialize"][:-len(train["initialize"])]
    assert "broadcast_module(@strategy)" in multi["train#trainer#strategy"]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-9)
    return a == b


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory) -> Path:
    """Two ranks, one epoch of two iterations; each rank's output_dir and ckpt_dir get its rank
    in their names, so that a file written by rank 1 would show."""
    root = tmp_path_factory.mktemp("dist")
    cohort = root / "cohort"
    generate_cohort(cohort, seed=0, n_train_cls=12, n_train_seg=4, n_val=5, n_test=0, spacing=8.0, num_workers=1)
    probe = {"output_dir": "$@probe_dir + '/eval' + str(@rank)", "ckpt_dir": "$@probe_dir + '/models' + str(@rank)",
             "finalize": [PROBE, "$dist.destroy_process_group()"]}
    (root / "probe.yaml").write_text(yaml.safe_dump(probe))
    overrides = {"dataset_dir": str(cohort), "demo_dir": str(cohort), "probe_dir": str(root), "epochs": 1,
                 "iters_per_epoch": 2, "diagnose_every": 1,
                 "igreg#prototype_warmup": 1, **TINY}                    # k-means between the two iterations
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    files = [str(CONFIGS / "train.yaml"), str(CONFIGS / "multi_gpu_train.yaml"), str(root / "probe.yaml")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(files), "--bundle_root", ".", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def test_ranks_end_with_the_same_state(torchrun):
    r0, r1 = (torch.load(torchrun / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    state = r0["strategy"]
    for group in ("network.", "surrogates.", "weighting.", "dpa."):
        assert any(k.startswith(group) for k in state), group
    assert _same(r0["strategy"], r1["strategy"]) and _same(r0["optimizers"], r1["optimizers"])
    assert bool(state["dpa.initialized"]) and state["weighting.log_vars"].abs().max() > 0  # trained
    assert any(k.endswith("running_mean") for k in state)  # BatchNorm statistics compared too
    assert not torch.equal(state["surrogates.0.classifier.heads.0.weight"], state["network.classifier.heads.0.weight"])
    for stream, cases in r0["streams"].items():  # each rank drew from its own share of every stream
        assert len(cases) and not set(cases.tolist()) & set(r1["streams"][stream].tolist()), stream


def test_only_rank_zero_wrote_files(torchrun):
    assert not (torchrun / "eval1").exists() and not (torchrun / "models1").exists()
    assert {"model.pt", "training_state.pt"} <= {p.name for p in (torchrun / "models0").iterdir()}
    written = {p.name for p in (torchrun / "eval0").iterdir()}
    assert "validation_metrics.csv" in written and any(n.startswith("events.out.tfevents") for n in written)
    with open(torchrun / "eval0" / "gradient_conflicts.csv") as f:  # measured by both ranks, written by rank 0
        assert [row["iteration"] for row in csv.DictReader(f)] == ["1", "2"]


def test_sharded_validation_equals_single_process_evaluation(torchrun, tmp_path):
    r0, r1 = (torch.load(torchrun / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert sorted([r0["val_cases"], r1["val_cases"]]) == [2, 3]  # unequal shards, no padding
    files = [str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")]
    wf = ConfigWorkflow(config_file=files, workflow_type="eval", run_id="evaluating", bundle_root=str(BUNDLE),
                        dataset_dir=str(torchrun / "cohort"), ckpt_dir=str(torchrun / "models0"),
                        output_dir=str(tmp_path), val_split="validation", **TINY)
    wf.initialize()
    wf.run()
    single = json.loads((tmp_path / "metrics.json").read_text())
    single.pop("calibration")  # the evaluation's calibration additions, not part of the validation metric
    for task in single["tasks"].values():
        del task["ece"], task["reliability"]
    assert single["dice_cases"] == 5 and _same(r0["report"], single) and _same(r1["report"], single)
