"""The scripts' command line: -h/--help print help and never start the work (a `main(**overrides)` would
otherwise take help=True as a config override and train)."""
import subprocess
import sys

import pytest
from conftest import BUNDLE

from scripts.cli import run


def test_help_prints_help_instead_of_running(capsys):
    calls = []

    def main(strategies: str = "igreg", **overrides):
        """Train every strategy."""
        calls.append((strategies, overrides))

    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as done:
            run(main, ["--strategies", "equal", flag])
        assert done.value.code == 0
        printed = capsys.readouterr()
        assert "--strategies" in printed.out + printed.err
    assert calls == []
    run(main, ["--strategies", "equal", "--learning_rate", "0.001"])
    assert calls == [("equal", {"learning_rate": 0.001})]


@pytest.mark.parametrize("module", ["scripts.ablation", "scripts.regime"])
def test_a_study_script_answers_help(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=BUNDLE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
    assert "--strategies" in done.stdout and "Engine run" not in done.stdout
