"""Errors the bundle raises reach the terminal as one clear line; IGREG_DEBUG=1 keeps the traceback."""
import logging
import os
import subprocess
import sys

from conftest import BUNDLE

import scripts.errors
from scripts.data import DatalistError
from scripts.errors import bundle_error, excepthook


def chained() -> RuntimeError:
    try:
        try:
            raise DatalistError("P1", "t2w", "missing (every case needs t1c and t2w)", "testing")
        except DatalistError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression: ...") from e
    except RuntimeError as e:
        return e


def test_bundle_error_is_one_line_and_debug_keeps_the_traceback(capsys, monkeypatch):
    err = chained()
    assert isinstance(bundle_error(err), DatalistError) and bundle_error(RuntimeError("x")) is None
    monkeypatch.delenv("IGREG_DEBUG", raising=False)
    excepthook(type(err), err, err.__traceback__)
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines == ["error (DatalistError): testing case 'P1', field 't2w': missing (every case needs t1c and t2w)",
                     "(set IGREG_DEBUG=1 to see the traceback)"]
    called = []
    monkeypatch.setattr(scripts.errors, "_previous", lambda *a: called.append(a))
    monkeypatch.setenv("IGREG_DEBUG", "1")
    excepthook(type(err), err, err.__traceback__)
    assert called and called[0][1] is err


def test_logged_bundle_errors_lose_their_traceback_unless_debugging(monkeypatch):
    logger = logging.getLogger("igreg.test")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        for debug in ("", "1"):
            monkeypatch.setenv("IGREG_DEBUG", debug)
            try:
                raise chained()
            except RuntimeError:
                logger.exception("Exception: run failed")
    finally:
        logger.removeHandler(handler)
    assert records[0].exc_info is None and records[1].exc_info is not None


def test_command_line_refusal_is_one_clear_message(tmp_path):
    (tmp_path / "empty").mkdir()
    configs = "['configs/inference.yaml','configs/demo.yaml']"
    env = {k: v for k, v in os.environ.items() if k != "IGREG_DEBUG"}
    empty = f"error (DatalistError): no case found under {tmp_path / 'empty'}"
    for extra, text in ((["--load_pretrain", "false"], empty),
                        (["--ckpt_path", str(tmp_path / "none.pt")],   # the checkpoint loads first (initialize)
                         f"error (CheckpointError): no checkpoint at '{tmp_path / 'none.pt'}'")):
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs,
               "--input_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out"), *extra]
        done = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=300,
                              env={**env, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 1
        assert text in done.stderr
        assert "Traceback" not in done.stderr + done.stdout and "Failed to evaluate" not in done.stderr
