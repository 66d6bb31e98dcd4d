"""model.pt through ignite's Checkpoint on an atomic DiskSaver: mode 0644, replaced in place, the settings
record kept, rank 0 only, and the best model chosen by the evaluator's key metric (also after a resume)."""
import os
import stat

import ignite.distributed
import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from scripts.checkpoint import CheckedCheckpointLoader, CheckpointError, atomic_save, checkpoint_settings, safe_load
from scripts.handlers import BestModelSaver
from scripts.savers import ModelFile


@pytest.fixture
def strict_umask():
    """A umask that would keep a file from the group and the others (tempfile's 0600 does so anyway)."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_model_file_is_readable_by_all_replaced_in_place_and_keeps_the_settings(tmp_path, strict_umask):
    net = nn.Linear(2, 2)
    file = ModelFile(net, tmp_path / "models", settings={"pixdim": [1.0, 1.0, 1.0]})
    file(Engine(lambda e, b: None))
    nn.init.constant_(net.weight, 3.0)
    file(Engine(lambda e, b: None))                             # the same name again: replaced
    path = tmp_path / "models" / "model.pt"
    assert os.listdir(path.parent) == ["model.pt"] and mode(path) == 0o644
    state = safe_load(path)
    assert torch.equal(state["weight"], torch.full((2, 2), 3.0))
    assert checkpoint_settings(state) == {"pixdim": [1.0, 1.0, 1.0]}
    other = CheckedCheckpointLoader(path, {"model": nn.Linear(2, 2)}, settings={"pixdim": [2.0, 2.0, 2.0]})
    with pytest.raises(CheckpointError, match="pixdim: checkpoint"):
        other()


def test_atomic_save_gives_mode_0644(tmp_path, strict_umask):
    atomic_save({"x": torch.ones(1)}, tmp_path / "training_state.pt")
    assert mode(tmp_path / "training_state.pt") == 0o644


class Flaky:
    """A 'network' whose state_dict cannot be pickled once `broken` is set."""

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    def __init__(self) -> None:
        self.broken = False

    def state_dict(self) -> dict:
        return {"x": self.Unpicklable() if self.broken else torch.ones(2)}


def test_failed_save_keeps_the_previous_model_and_no_temporary(tmp_path):
    net = Flaky()
    file = ModelFile(net, tmp_path)
    file(Engine(lambda e, b: None))
    net.broken = True
    with pytest.raises(RuntimeError, match="boom"):             # Checkpoint's remove must not have deleted it
        file(Engine(lambda e, b: None))
    assert os.listdir(tmp_path) == ["model.pt"] and torch.equal(safe_load(tmp_path / "model.pt")["x"], torch.ones(2))


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(ignite.distributed, "get_rank", lambda: 1)
    ModelFile(nn.Linear(2, 2), tmp_path / "models")(Engine(lambda e, b: None))
    assert not (tmp_path / "models").exists()


def validations(saver: BestModelSaver, net: nn.Module, scores: list[float], best: tuple[float, int] = (-1.0, -1)):
    """An evaluator run once per score (epochs 1, 2, ...) that keeps the best as MONAI's evaluator does
    (strictly greater), the network's weight set to the epoch; returns the epochs whose model.pt was written."""
    evaluator = Engine(lambda e, b: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = best

    @evaluator.on(Events.EPOCH_COMPLETED)
    def key_metric(engine: Engine) -> None:
        epoch = engine.state.epoch
        nn.init.constant_(net.weight, float(epoch))
        if scores[epoch - 1] > engine.state.best_metric:
            engine.state.best_metric, engine.state.best_metric_epoch = scores[epoch - 1], epoch

    saver.attach(evaluator)
    written: list[int] = []

    @evaluator.on(Events.EPOCH_COMPLETED)
    def record(engine: Engine) -> None:
        if saver.path.exists():
            written.append(int(safe_load(saver.path)["weight"][0, 0]))

    evaluator.run([0], max_epochs=len(scores))
    return written


def test_best_model_follows_the_evaluators_key_metric_also_after_a_resume(tmp_path):
    net = nn.Linear(1, 1)
    assert validations(BestModelSaver(net, str(tmp_path)), net, [0.5, 0.4, 0.7, 0.7]) == [1, 1, 3, 3]
    # a resumed run: the evaluator's best (0.7 at epoch 3) restored, a new saver; a worse score keeps model.pt
    assert validations(BestModelSaver(net, str(tmp_path)), net, [0.6], best=(0.7, 3)) == [3]
