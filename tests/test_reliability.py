"""Reliability of training: resume after SIGKILL at any point, fallback to the previous training
state, guarded (non-finite) updates and determinism."""
import functools
import logging
import multiprocessing
import os
import signal
from pathlib import Path

import lion_pytorch
import pytest
import torch
from conftest import BUNDLE, TINY_NET
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.utils import set_determinism
from torch import nn

import scripts.handlers
from scripts.checkpoint import CheckpointError, safe_load
from scripts.data import generate_cohort
from scripts.engine import IGRegTrainer, NonFiniteTrainingError
from scripts.handlers import TrainingState
from scripts.mtl import build_strategy
from scripts.networks import IGRegNet

CONFIGS = [str(BUNDLE / "configs" / f"{n}.yaml") for n in ("train", "demo")]
RUN = {  # 2 epochs x 2 iterations of the default IGReg strategy on 32^3 volumes, a state each iteration
    "epochs": 2, "iters_per_epoch": 2, "save_every": 1, "pixdim": [8.0, 8.0, 8.0], "spatial_size": [32, 32, 32],
    "num_workers": 0, "cache": "none", "network_def#num_channels": 4, "network_def#widths": [8, 16, 16, 16],
    "network_def#cardinality": 2, "network_def#depths": [1, 1, 1, 1],
}
STATE = "models/training_state.pt"
PREVIOUS = "models/training_state.prev.pt"


def training(run: Path, cohort: Path) -> tuple[ConfigWorkflow, IGRegTrainer]:
    """The bundle's training workflow writing into `run`, seeded before the network is built."""
    wf = ConfigWorkflow(config_file=CONFIGS, workflow_type="train", run_id="training", bundle_root=str(BUNDLE),
                        dataset_dir=str(cohort), output_dir=str(run / "eval"), ckpt_dir=str(run / "models"), **RUN)
    wf.initialize()
    set_determinism(seed=0)
    return wf, wf.parser.get_parsed_content("train#trainer")


def train(run: Path, cohort: Path, kill_point: str | None = None) -> None:
    """The training command; SIGKILLs its own process at `kill_point`:
    `validation` during the first validation (after iteration 2, before that epoch's state is saved),
    `save` when iteration 3's state is about to be written (the previous file already moved aside),
    `step` right after iteration 4's main optimizer update."""
    wf, trainer = training(run, cohort)

    def die(*_: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_point == "validation":
        wf.parser.get_parsed_content("validate#evaluator").add_event_handler(Events.ITERATION_COMPLETED(once=2), die)
    elif kill_point == "save":
        save = scripts.handlers.atomic_save

        def save_or_die(obj: object, path: str) -> None:
            if Path(path).name == "training_state.pt" and trainer.state.iteration == 3:
                die()
            save(obj, path)

        scripts.handlers.atomic_save = save_or_die
    elif kill_point == "step":
        trainer.strategy.optimizers[0].register_step_post_hook(
            lambda *_: die() if trainer.state.iteration == 4 else None)
    wf.run()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root, seed=0, n_train_cls=12, n_train_seg=4, n_val=4, n_test=0, spacing=8.0)
    return root


def record_losses(trainer: IGRegTrainer) -> list[dict[str, float]]:
    losses: list[dict[str, float]] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: losses.append({k: float(v) for k, v in e.state.output[0].items()}))
    return losses


@pytest.fixture(scope="module")
def straight(cohort, tmp_path_factory) -> tuple[Path, list[dict[str, float]]]:
    """An uninterrupted run: its folder and the loss terms of each iteration."""
    run = tmp_path_factory.mktemp("straight")
    wf, trainer = training(run, cohort)
    losses = record_losses(trainer)
    wf.run()
    return run, losses


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_training_killed_three_times_ends_with_the_weights_of_an_uninterrupted_run(cohort, straight, tmp_path):
    def command(*kill_point: str) -> int:
        """The training command in a new process (forked: the modules are already imported)."""
        process = multiprocessing.get_context("fork").Process(target=train, args=(tmp_path, cohort, *kill_point))
        process.start()
        process.join(timeout=300)
        if process.is_alive():
            process.kill()
            pytest.fail(f"training with kill point {kill_point} did not end within 300 s")
        return process.exitcode

    def iteration(name: str) -> int:
        return safe_load(tmp_path / name)["iteration"]

    assert command("validation") == -signal.SIGKILL
    assert iteration(STATE) == 1 and not (tmp_path / PREVIOUS).exists()
    assert command("save") == -signal.SIGKILL
    assert not (tmp_path / STATE).exists() and iteration(PREVIOUS) == 2
    assert command("step") == -signal.SIGKILL
    assert iteration(STATE) == 3 and iteration(PREVIOUS) == 2
    assert command() == 0
    expected, found = safe_load(straight[0] / STATE), safe_load(tmp_path / STATE)
    assert found["iteration"] == expected["iteration"] == 4
    assert_same_state(found["strategy"], expected["strategy"])
    torch.testing.assert_close(found["optimizers"], expected["optimizers"], rtol=0, atol=0)
    for key in ("lr_schedule", "loader", "best"):
        assert found[key] == expected[key], key
    assert found["skipped"] == [0, 0]
    assert_same_state(safe_load(tmp_path / "models/model.pt"), safe_load(straight[0] / "models/model.pt"))


def test_same_seed_gives_the_same_losses_and_weights(cohort, straight, tmp_path):
    wf, trainer = training(tmp_path, cohort)
    losses = record_losses(trainer)
    wf.run()
    assert len(losses) == 4 and losses == straight[1]
    assert_same_state(trainer.strategy.state_dict(), safe_load(straight[0] / STATE)["strategy"])


class Counter(nn.Module):
    """A stand-in strategy: one parameter, one optimizer; each iteration adds 1 to the parameter."""

    def __init__(self, size: int = 3) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(size))
        self.optimizers = [torch.optim.SGD(self.parameters(), lr=0.1)]


def run_counter(ckpt_dir: Path, iterations: int, strategy: Counter | None = None) -> list[int]:
    """Run `iterations` (epochs of 3) with a state saved each iteration; returns the iterations run."""
    strategy, done = strategy or Counter(), []

    def step(engine: Engine, _: object) -> None:
        strategy.w.data.add_(1)
        done.append(engine.state.iteration)

    engine = Engine(step)
    engine.state.skipped_steps = engine.state.consecutive_skipped = 0
    TrainingState(strategy, None, str(ckpt_dir), save_every=1).attach(engine)
    engine.run(range(3), max_epochs=iterations // 3, epoch_length=3)
    return done


def test_damaged_newest_state_falls_back_to_the_previous_one(tmp_path, caplog):
    state, previous = tmp_path / "training_state.pt", tmp_path / "training_state.prev.pt"
    assert run_counter(tmp_path, 6) == [1, 2, 3, 4, 5, 6]
    assert safe_load(state)["iteration"] == 6 and safe_load(previous)["iteration"] == 5
    state.write_bytes(state.read_bytes()[:-200])                  # truncated
    stale = tmp_path / ".training_state.pt.abc.tmp"               # left by a process killed while saving
    stale.write_bytes(b"partial")
    resumed = Counter()
    with caplog.at_level(logging.WARNING, logger="scripts.handlers"):
        assert run_counter(tmp_path, 6, resumed) == [6]           # from iteration 5, the previous state
    assert f"training state {state} cannot be used" in caplog.text and "previous training state" in caplog.text
    assert torch.equal(resumed.w.detach(), torch.full((3,), 6.0)) and not stale.exists()
    assert safe_load(state)["iteration"] == 6 and safe_load(previous)["iteration"] == 5  # damaged file not kept
    previous.write_bytes(b"not a checkpoint")
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no usable training state") as err:
        TrainingState(Counter(), None, str(tmp_path)).read()
    assert str(state) in str(err.value) and str(previous) in str(err.value)


def test_state_of_another_configuration_is_refused(tmp_path):
    run_counter(tmp_path, 3)
    saver = TrainingState(Counter(size=4), None, str(tmp_path))
    with pytest.raises(CheckpointError, match="another configuration") as err:
        saver.load(Engine(lambda e, b: None))
    assert "w: checkpoint shape (3,) vs network (4,)" in str(err.value)


SIZE = 32


def batch(nan: bool = False) -> dict:
    """Two tasks: a class-0 and a class-1 row for each, then one segmentation row; `nan`: one NaN voxel."""
    gen = torch.Generator().manual_seed(0)
    label = torch.tensor([[0, -1], [1, -1], [-1, 0], [-1, 1], [-1, -1]])
    seg = torch.zeros(5, 1, SIZE, SIZE, SIZE)
    seg[-1, :, 8:20, 10:22, 6:18] = 1
    image = torch.randn(5, 2, SIZE, SIZE, SIZE, generator=gen) + 2 * seg
    if nan:
        image[1, 0, 3, 4, 5] = float("nan")
    return {"image": image, "label": label, "seg": seg, "has_seg": torch.tensor([False] * 4 + [True]),
            "case_id": [f"case{i}" for i in range(5)]}


def guarded_trainer(batches: list[dict], ckpt_dir: Path) -> tuple[IGRegTrainer, list[dict], list[dict]]:
    """A tiny IGReg trainer (max_bad_steps=2, a state each iteration); returns it, the outputs and
    a copy of the strategy's state after each iteration."""
    torch.manual_seed(0)
    net = IGRegNet(tasks=("idh", "grade"), **TINY_NET)
    strategy = build_strategy("igreg", net, functools.partial(lion_pytorch.Lion, lr=1e-3),
                              igreg={"proto_dim": 8, "nc_neg": 2, "nc_pos": 2, "surrogate_steps": 1})
    saver = TrainingState(strategy, None, str(ckpt_dir), save_every=1)
    trainer = IGRegTrainer("cpu", 1, batches, strategy, epoch_length=len(batches), prototype_loader=[batch()],
                           train_handlers=[saver], max_bad_steps=2)
    outputs, states = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output[0]))
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: states.append({k: v.clone() for k, v in strategy.state_dict().items()}))
    return trainer, outputs, states


def test_nan_batch_is_skipped_counted_and_leaves_the_state_unchanged(tmp_path, caplog):
    trainer, outputs, states = guarded_trainer([batch(), batch(nan=True), batch()], tmp_path)
    with caplog.at_level(logging.WARNING, logger="scripts.engine"):
        trainer.run()
    assert [float(o["skipped"]) for o in outputs] == [0.0, 1.0, 0.0]
    assert not torch.isfinite(outputs[1]["loss"]) and torch.isfinite(outputs[2]["loss"])
    main = [k for k in states[0] if not k.startswith("surrogates.")]  # surrogates: re-copied at each step
    assert_same_state({k: states[1][k] for k in main}, {k: states[0][k] for k in main})  # BatchNorm stats too
    assert any(not torch.equal(states[2][k], states[1][k]) for k in states[1])
    assert (trainer.state.skipped_steps, trainer.state.consecutive_skipped) == (1, 0)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and warning[0].startswith("iteration 2: update skipped, not finite: ")
    assert {"surrogate", "cls", "seg", "gradient"} <= set(warning[0].split(": ")[2].split(" (")[0].split(", "))
    assert warning[0].endswith("in all); non-finite voxels in case(s) case1")  # the row with the NaN voxel


def test_consecutive_non_finite_steps_stop_training_keeping_the_last_good_state(tmp_path):
    trainer, outputs, states = guarded_trainer([batch(), batch(nan=True), batch(nan=True), batch()], tmp_path)
    with pytest.raises(NonFiniteTrainingError, match="iteration 3: 2 consecutive updates were skipped"):
        trainer.run()
    assert len(outputs) == 2                                      # iteration 3 raised before completing
    saved = safe_load(tmp_path / "training_state.pt")
    assert saved["iteration"] == 2 and saved["skipped"] == [1, 1]
    main = [k for k in states[0] if not k.startswith("surrogates.")]
    for now in (saved["strategy"], trainer.strategy.state_dict()):  # the weights of the last good update
        assert_same_state({k: now[k] for k in main}, {k: states[0][k] for k in main})
