"""Training options checked before the first iteration, one training per ckpt_dir, resume with a changed
schedule, and no run ending without a usable model.pt (issue items 6 and 7)."""
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow

from scripts.checkpoint import checkpoint_settings, safe_load
from scripts.data import generate_cohort
from scripts.engine import CosineSchedule
from scripts.handlers import TrainingState
from scripts.options import LOCK_NAME, OptionError, TrainingLockError, acquire_training_lock, release_training_locks

CONFIGS = [str(BUNDLE / "configs" / f"{n}.yaml") for n in ("train", "demo")]
RUN = {  # 1 epoch x 1 iteration of the default IGReg strategy on 32^3 volumes
    "epochs": 1, "iters_per_epoch": 1, "save_every": 1, "pixdim": [8.0, 8.0, 8.0], "spatial_size": [32, 32, 32],
    "num_workers": 0, "cache": "none", "network_def#num_channels": 4, "network_def#widths": [8, 16, 16, 16],
    "network_def#cardinality": 2, "network_def#depths": [1, 1, 1, 1],
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root, seed=0, n_train_cls=12, n_train_seg=4, n_val=2, n_test=0, spacing=8.0)
    return root


def workflow(cohort: Path, run: Path, **overrides) -> ConfigWorkflow:
    dirs = {"dataset_dir": str(cohort), "output_dir": str(run / "eval"), "ckpt_dir": str(run / "models")}
    wf = ConfigWorkflow(config_file=CONFIGS, workflow_type="train", run_id="training", bundle_root=str(BUNDLE),
                        **{**RUN, **dirs, **overrides})
    wf.initialize()
    return wf


def cause(err: BaseException, kind: type) -> BaseException:
    e: BaseException | None = err
    while e is not None and not isinstance(e, kind):
        e = e.__cause__ or e.__context__
    assert e is not None, f"no {kind.__name__} in {err!r}"
    return e


@pytest.mark.parametrize("option, value, text", [
    ("save_every", 0, "option --save_every must be an integer >= 1, got 0"),
    ("learning_rate", "abc", "option --learning_rate must be a finite number > 0.0, got 'abc'"),
    ("val_interval", 0, "option --val_interval must be an integer >= 1, got 0"),
    ("iters_per_epoch", 0, "option --iters_per_epoch must be an integer >= 1, got 0"),
    ("samples_per_class", 0, "option --samples_per_class must be an integer >= 1, got 0"),
    ("epochs", 2.5, "option --epochs must be an integer >= 1, got 2.5"),
    ("cache", "ram", "option --cache must be one of none, memory, disk; got 'ram'"),
    ("mtl_strategy", "best", "option --mtl_strategy must be one of "),
    ("spatial_size", [30, 30, 30], "option --spatial_size must be three integers, each a multiple of 16"),
    ("resume", "maybe", "option --resume must be true or false, got 'maybe'"),
    ("min_lr", 1.0, "option --min_lr (1.0) must not exceed --learning_rate"),
])
def test_defect7_every_option_is_checked_before_the_first_iteration(cohort, tmp_path, option, value, text):
    wf = workflow(cohort, tmp_path, **{option: value})
    with pytest.raises(Exception) as err:
        wf.run()
    assert text in str(cause(err.value, OptionError))
    assert not (tmp_path / "models" / "training_state.pt").exists()


def test_defect7_unwritable_ckpt_dir_is_refused_at_start(cohort, tmp_path):
    (tmp_path / "file").write_text("x")
    wf = workflow(cohort, tmp_path, ckpt_dir=str(tmp_path / "file" / "models"))
    with pytest.raises(Exception) as err:
        wf.run()
    assert "option --ckpt_dir: cannot write in" in str(cause(err.value, OptionError))


def test_defect7_second_training_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": other.pid, "host": __import__("socket").gethostname()}))
        with pytest.raises(TrainingLockError, match=f"another training \\(pid {other.pid}\\) is using {tmp_path}"):
            acquire_training_lock(tmp_path)
    finally:
        other.kill()
        other.wait()
    with caplog.at_level(logging.WARNING, logger="scripts.options"):   # killed -9: its lock is stale
        assert acquire_training_lock(tmp_path) == str(tmp_path / LOCK_NAME)
    assert f"stale lock {tmp_path / LOCK_NAME} of process {other.pid}" in caplog.text
    assert acquire_training_lock(tmp_path)                             # this process again: fine
    release_training_locks()
    assert not (tmp_path / LOCK_NAME).exists()


def test_defect7_without_validation_cases_model_pt_is_the_last_model_and_a_rerun_says_finished(
        cohort, tmp_path, capfd):
    content = json.loads((cohort / "datalist.json").read_text())
    content["validation"] = []
    datalist = cohort / "no_validation.json"
    datalist.write_text(json.dumps(content))
    workflow(cohort, tmp_path, datalist=str(datalist)).run()
    model = safe_load(tmp_path / "models" / "model.pt")
    assert checkpoint_settings(model)["network"]["pooling"] == "max"
    assert "no validation cases" in "".join(capfd.readouterr())
    workflow(cohort, tmp_path, datalist=str(datalist)).run()
    assert "this training is already finished" in "".join(capfd.readouterr())


class Counter(torch.nn.Module):
    def __init__(self, lr: float = 0.1, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.optimizers = [torch.optim.SGD(self.parameters(), lr=lr, weight_decay=weight_decay)]


def run_schedule(ckpt_dir: Path, epochs: int, lr: float = 0.1, weight_decay: float = 0.0) -> tuple[list, Counter]:
    """Epochs of 3 iterations under a cosine schedule from `lr` to 0; returns the rate of each iteration."""
    strategy = Counter(lr, weight_decay)
    schedule = CosineSchedule(strategy.optimizers, total_steps=3 * epochs, min_lr=0.0)
    optimizer = strategy.optimizers[0]
    engine = Engine(lambda e, b: (optimizer.step(), optimizer.param_groups[0]["lr"])[1])  # step, then the schedule
    engine.state.skipped_steps = engine.state.consecutive_skipped = 0
    rates: list[float] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: rates.append(e.state.output))
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: schedule.step())
    TrainingState(strategy, schedule, str(ckpt_dir), save_every=1).attach(engine)
    engine.run(range(3), max_epochs=epochs, epoch_length=3)
    return rates, strategy


def cosine(step: int, total: int, lr: float = 0.1) -> float:
    return lr * (1 + math.cos(math.pi * step / total)) / 2


def test_defect6_resume_with_other_epochs_or_learning_rate_rebuilds_the_schedule(tmp_path, caplog):
    rates, _ = run_schedule(tmp_path, 2)
    assert rates == pytest.approx([cosine(i, 6) for i in range(6)])
    with caplog.at_level(logging.WARNING, logger="scripts.handlers"):
        more, _ = run_schedule(tmp_path, 3)                       # --epochs 3: 9 steps in all
    assert more == pytest.approx([cosine(i, 9) for i in (6, 7, 8)])  # never climbs back towards lr
    assert all(a > b for a, b in zip(more, more[1:]))
    assert "total steps (epochs x iters_per_epoch) 6 -> 9" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scripts.handlers"):
        faster, strategy = run_schedule(tmp_path, 4, lr=0.2, weight_decay=0.01)   # and another learning rate
    assert faster == pytest.approx([cosine(i, 12, 0.2) for i in (9, 10, 11)])
    assert "learning_rate 0.1 -> 0.2" in caplog.text and "weight_decay 0.0 -> 0.01" in caplog.text
    assert strategy.optimizers[0].param_groups[0]["weight_decay"] == 0.01


def test_defect6_resumed_training_with_more_epochs_ends_at_min_lr(cohort, tmp_path, capfd):
    """Through the configs: `--epochs 1`, then the same command with `--epochs 2` and another learning rate."""
    workflow(cohort, tmp_path, epochs=1, iters_per_epoch=2).run()
    wf = workflow(cohort, tmp_path, epochs=2, iters_per_epoch=2, learning_rate=2.0e-3)
    trainer = wf.parser.get_parsed_content("train#trainer")
    rates = []
    trainer.add_event_handler(Events.ITERATION_STARTED,
                              lambda e: rates.append(e.strategy.optimizers[0].param_groups[0]["lr"]))
    wf.run()
    log = "".join(capfd.readouterr())
    assert "total steps (epochs x iters_per_epoch) 2 -> 4" in log and "learning_rate 0.001 -> 0.002" in log
    min_lr = wf.parser.get_parsed_content("min_lr")
    assert rates == pytest.approx([min_lr + (2e-3 - min_lr) * (1 + math.cos(math.pi * s / 4)) / 2 for s in (2, 3)])
    final = safe_load(tmp_path / "models" / "training_state.pt")
    assert final["iteration"] == 4 and final["lr_schedule"]["schedulers"][0]["T_max"] == 4
    assert final["lr_schedule"]["schedulers"][0]["_last_lr"][0] == pytest.approx(min_lr)
