"""Every command the model card (bundle/docs/README.md) shows, run on tiny settings.

Each ```bash block of the card is one test; its commands run in order, as a user runs them after
`bash demo.sh`:

- Where: each block gets its own copy of a repository folder in the state `bash demo.sh` leaves: in
  `bundle/`, `demo_data/` is a tiny generated cohort and `models/`, `eval/` come from demo.sh's own
  `python -m monai.bundle` lines run with the tiny settings (`configs/` and `scripts/` link to the bundle's).
  A block runs from that bundle folder, as the card says; a block with `cd bundle` from the repository root.
- Placeholders: `/data` is the block's data folder: `cases/` (the tiny cohort's case folders),
  `labels.csv` (their labels), `datalist.json` (the cohort's datalist, left out when the block writes
  it) and `new_cases/` (the testing cases' images); `N` of `--nproc_per_node` is 2.
- Tiny settings, appended (or replacing the card's value of the same option): `TINY` (8 mm, 32³, the
  narrowest network, no workers, no cache) for every bundle run and export; a training also gets 1 epoch
  of 2 iterations and, unless the card names them, a `ckpt_dir` and `output_dir` of its own, so that it
  trains instead of resuming the demo's finished run; the ablation one seed of 1-iteration runs on the
  tiny cohort.
- How each command runs (`classify`):
  `bash demo.sh`: its `python -m` lines, which made the folder (its `bash setup.sh` installs packages and
  is not run); `source .venv/bin/activate`: nothing, the test runs in the project's environment;
  `cd bundle`: the block goes on in the bundle folder; `python -m monai.bundle run|ckpt_export ...` and
  `python -m scripts.<module> ...` (the modules of `SCRIPTS`): in this process through runpy, with the
  command's arguments as sys.argv, as `python -m` runs them; `torchrun ...`: `python -m
  torch.distributed.run ...` in a subprocess, two gloo ranks. Any other command fails its block's test:
  a command added to the card needs a runner here.

Each command must succeed and write what it is for (`EXPECTED`: a model, a report, predictions, a
TorchScript module, the ablation table, a datalist), and each option it passes to the configs must be one
of their ids (MONAI would ignore a misspelt one).
"""
from __future__ import annotations

import ast
import csv
import inspect
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import monai.bundle
import pytest
import test_bundle
import torch
from conftest import BUNDLE, REPO
from monai.bundle import ConfigParser
from test_bundle import TINY

from scripts.ablation import DEFAULT_CONFIGS as ABLATION_CONFIGS
from scripts.ablation import main as ablation

CARD = BUNDLE / "docs" / "README.md"
DEMO_SH = REPO / "demo.sh"
NPROC = "2"                                      # `N` of `torchrun --nproc_per_node=N`: two gloo ranks
TRAIN_TINY = {"epochs": 1, "iters_per_epoch": 2}
SCRIPTS = {  # the bundle's command-line modules the card may show, with their tiny settings
    "scripts.prepare_datalist": {},
    "scripts.ablation": {"seeds": "0", "epochs": 1, "iters_per_epoch": 1, "diagnose_every": 1, **TINY},
}
NOT_RUN = {"bash setup.sh": "installs PyTorch, MONAI and the other packages into .venv"}  # in demo.sh
EXPECTED = {"train": "model.pt", "torchrun": "model.pt", "eval": "metrics.json", "infer": "predictions.csv",
            "scripts.ablation": "ablation.md"}
SHELL_SYNTAX = {"&&", "||", "|", "&", ";", ">", ">>", "<", "2>&1"}
cohort = test_bundle.cohort  # the tiny cohort (fixture): 12 + 4 training, 4 validation, 3 testing cases


class UnknownCommand(AssertionError):
    pass


# ---- reading the card -----------------------------------------------------------------------------
def strip_comment(line: str) -> str:
    """The line without its shell comment (a `#` that starts a word outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def commands(script: str) -> list[list[str]]:
    """The commands of a shell script as argument lists (a trailing backslash continues a line)."""
    lines = [strip_comment(line) for line in script.splitlines()]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [tokens for tokens in (shlex.split(line) for line in joined.splitlines()) if tokens]


def card_blocks(text: str) -> list[tuple[str, list[list[str]]]]:
    """(section heading, commands) of every ```bash block, in order."""
    blocks, heading, body = [], "top", None
    for line in text.splitlines():
        if body is not None:
            if line.startswith("```"):
                blocks.append((heading, commands("\n".join(body))))
                body = None
            else:
                body.append(line)
        elif line.startswith("```bash"):
            body = []
        elif line.startswith("## "):
            heading = line[3:].strip()
    assert body is None, "a ```bash block of the model card is not closed"
    return blocks


BLOCKS = card_blocks(CARD.read_text(encoding="utf-8"))


def option(args: list[str], key: str) -> str | None:
    flag = f"--{key}"
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def set_option(args: list[str], key: str, value) -> None:
    """Give option `key` the value: replaced where the command has it, else appended."""
    value = value if isinstance(value, str) else json.dumps(value)
    flag = f"--{key}"
    for i, a in enumerate(args):
        if a == flag:
            args[i + 1] = value
            return
        if a.startswith(flag + "="):
            args[i] = f"{flag}={value}"
            return
    args += [flag, value]


def config_files(args: list[str]) -> list[str]:
    value = option(args, "config_file") or ""
    return [str(v) for v in ast.literal_eval(value)] if value.startswith("[") else [value]


def classify(tokens: list[str]) -> str:
    """Which runner runs a command; UnknownCommand for one this test cannot run."""
    unknown = UnknownCommand(f"the model card shows a command this test cannot run: {shlex.join(tokens)!r}; "
                             "add a runner for it to tests/test_model_card.py")
    if any(t in SHELL_SYNTAX or t.endswith(";") for t in tokens) or "=" in tokens[0]:
        raise unknown
    if tokens in (["bash", "demo.sh"], ["source", ".venv/bin/activate"], ["cd", "bundle"]):
        return {"bash": "demo", "source": "venv", "cd": "cd"}[tokens[0]]
    if tokens[:3] == ["python", "-m", "monai.bundle"] and tokens[3:4] == ["ckpt_export"]:
        return "ckpt_export"
    if tokens[:4] == ["python", "-m", "monai.bundle", "run"]:
        names = [Path(c).name for c in config_files(tokens)]
        for config, kind in (("inference.yaml", "infer"), ("evaluate.yaml", "eval"), ("train.yaml", "train")):
            if config in names:
                return kind
        raise UnknownCommand(f"{shlex.join(tokens)!r}: this test cannot run a bundle run without "
                             "configs/train.yaml or configs/inference.yaml")
    if tokens[:2] == ["python", "-m"] and len(tokens) > 2 and tokens[2] in SCRIPTS:
        return tokens[2]
    if tokens[0] == "torchrun" and "-m" in tokens and tokens[tokens.index("-m") + 1:][:2] == ["monai.bundle", "run"]:
        return "torchrun"
    raise unknown


# ---- running a command ----------------------------------------------------------------------------
def substitute(tokens: list[str], data: Path | None) -> list[str]:
    """The card's placeholders replaced: `/data` by the data folder, `N` ranks by NPROC."""
    out = []
    for i, t in enumerate(tokens):
        if data is not None:
            t = re.sub(r"(^|=)/data(?=/|$)", lambda m: m.group(1) + str(data), t)
        if t == "--nproc_per_node=N" or (t == "N" and i and tokens[i - 1] == "--nproc_per_node"):
            t = t.replace("N", NPROC)
        out.append(t)
    return out


def python_m(module: str, args: list[str], cwd: Path) -> None:
    """`python -m module args` in this process, from `cwd`."""
    argv, here = sys.argv, os.getcwd()
    sys.argv = [module, *args]
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)  # imported by other tests
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise AssertionError(f"python -m {module} exited with {e.code!r}") from e
    finally:
        sys.argv = argv
        os.chdir(here)


def files_under(root: Path) -> dict[Path, int]:
    """Every file below `root` (not below linked folders) with its modification time."""
    return {Path(d, f): os.stat(Path(d, f), follow_symlinks=False).st_mtime_ns
            for d, _, names in os.walk(root) for f in names}


def option_names(args: list[str]) -> list[str]:
    """The names of a command's `--name value` and `--name=value` options."""
    names, value_next = [], False
    for a in args:
        if value_next:
            value_next = False
        elif a.startswith("--"):
            name, eq, _ = a[2:].partition("=")
            names.append(name)
            value_next = not eq
    return names


def check_config_ids(kind: str, tokens: list[str], cwd: Path) -> None:
    """An option that is no parameter of the command goes to the configs, and MONAI ignores an id they do
    not define: each such option the card shows must be an id of the configs the command merges."""
    entry = {"train": monai.bundle.run, "eval": monai.bundle.run, "infer": monai.bundle.run,
             "torchrun": monai.bundle.run, "ckpt_export": monai.bundle.ckpt_export, "scripts.ablation": ablation}
    if kind not in entry:
        return
    args = tokens[tokens.index("-m"):]  # torchrun's own options come before it
    files = config_files(args) if option(args, "config_file") else list(ABLATION_CONFIGS)
    parser = ConfigParser()
    parser.read_config([str(cwd / f) for f in files])
    unknown = [n for n in option_names(args) if n not in inspect.signature(entry[kind]).parameters and n not in parser]
    assert not unknown, f"{shlex.join(tokens)!r}: no id {unknown} in {files}"


def run_command(tokens: list[str], cwd: Path, data: Path | None, fresh: Path | None) -> Path:
    """Run one command with the tiny settings; returns the folder the block goes on in. `fresh`: where
    a training that names no ckpt_dir/output_dir writes (None: the defaults, as demo.sh)."""
    kind = classify(tokens)
    check_config_ids(kind, tokens, cwd)
    args = substitute(tokens, data)
    if kind in ("demo", "venv"):  # the folder is in demo.sh's state already; the test runs in the environment
        assert (cwd / "demo.sh").is_file(), f"{shlex.join(tokens)!r} runs from the repository root, not {cwd}"
        assert (cwd / "bundle" / "models" / "model.pt").is_file()
        return cwd
    if kind == "cd":
        assert (cwd / args[1]).is_dir(), f"no folder {args[1]} in {cwd}"
        return cwd / args[1]
    if kind.startswith("scripts."):
        for key, value in SCRIPTS[kind].items():
            set_option(args, key, value)
        if kind == "scripts.ablation":  # its configs' bundle_root is the bundle itself: point it at the cohort
            set_option(args, "dataset_dir", str((cwd / "demo_data").resolve()))
        python_m(kind, args[3:], cwd)
        return cwd
    for key, value in TINY.items():
        set_option(args, key, value)
    if kind in ("train", "torchrun"):
        for key, value in TRAIN_TINY.items():
            set_option(args, key, value)
        for key in ("ckpt_dir", "output_dir"):
            if fresh is not None and option(args, key) is None:
                set_option(args, key, str(fresh / key))
    if kind == "torchrun":
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args[1:]], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return cwd
    python_m("monai.bundle", args[3:], cwd)
    if kind == "ckpt_export":
        module = torch.jit.load(str(cwd / option(args, "filepath")))
        with torch.no_grad():
            out = module(torch.zeros(1, 2, 32, 32, 32))
        assert set(out) == {"seg", "1p19q", "idh", "grade"} and out["idh"].shape == (1, 2)
    return cwd


def run_block(block: list[list[str]], repo: Path, data: Path) -> None:
    """The block's commands in order, each checked for what it writes."""
    kinds = [classify(tokens) for tokens in block]  # every command known before any runs
    cwd = repo if ["cd", "bundle"] in block else repo / "bundle"
    for n, (tokens, kind) in enumerate(zip(block, kinds)):
        before = files_under(repo.parent)
        cwd = run_command(tokens, cwd, data, fresh=repo.parent / f"run{n}")
        written = [p for p, t in files_under(repo.parent).items() if before.get(p) != t]  # new or rewritten
        if kind in EXPECTED:
            assert EXPECTED[kind] in {p.name for p in written}, f"{shlex.join(tokens)!r} wrote no {EXPECTED[kind]}"
        if option(tokens, "output") is not None and kind == "scripts.prepare_datalist":
            made = json.loads(Path(substitute([option(tokens, "output")], data)[0]).read_text())
            assert made["training"] and made["validation"] and made["testing"]
        if kind == "infer":
            with open(next(p for p in written if p.name == "predictions.csv")) as f:
                rows = list(csv.DictReader(f))
            assert len(rows) == len(list((data / "new_cases").iterdir()))  # the testing cases, either way


# ---- the session after `bash demo.sh` -------------------------------------------------------------
def demo_sh_commands() -> list[list[str]]:
    """demo.sh's `python -m` commands, as the venv's python runs them from the bundle folder."""
    found = []
    for tokens in commands(DEMO_SH.read_text()):
        if shlex.join(tokens) in NOT_RUN:
            continue
        starts = [i for i, t in enumerate(tokens[:-1]) if Path(t).name == "python" and tokens[i + 1] == "-m"]
        if not starts:
            assert not any(Path(t).name.startswith("python") for t in tokens), shlex.join(tokens)
            continue
        command = ["python"]
        for t in tokens[starts[0] + 1:]:
            if t in SHELL_SYNTAX or t.startswith(">") or t.endswith(";"):
                break
            if t != "$@":
                command.append(t)
        found.append(command)
    return found


@pytest.fixture(scope="module")
def after_demo(cohort, tmp_path_factory) -> Path:
    """A repository folder as `bash demo.sh` leaves it (tiny), made by demo.sh's own commands."""
    repo = tmp_path_factory.mktemp("after_demo") / "repo"
    bundle = repo / "bundle"
    bundle.mkdir(parents=True)
    (repo / "demo.sh").symlink_to(DEMO_SH)
    for name in ("configs", "scripts"):
        (bundle / name).symlink_to(BUNDLE / name, target_is_directory=True)
    (bundle / "demo_data").symlink_to(cohort, target_is_directory=True)
    for tokens in demo_sh_commands():
        run_command(tokens, bundle, None, fresh=None)
    assert torch.load(bundle / "models" / "training_state.pt", weights_only=True)["iteration"] == 2
    assert torch.load(bundle / "models" / "model.pt", weights_only=True)  # the best model, a state_dict
    report = json.loads((bundle / "eval" / "testing" / "metrics.json").read_text())  # its testing-split scores
    assert set(report["tasks"]) == {"1p19q", "idh", "grade"}
    return repo


def data_folder(root: Path, cohort: Path, block: list[list[str]]) -> Path:
    data = root / "data"
    (data / "new_cases").mkdir(parents=True)
    (data / "cases").symlink_to(cohort / "cases", target_is_directory=True)
    splits = json.loads((cohort / "datalist.json").read_text())
    if not any(option(tokens, "output") == "/data/datalist.json" for tokens in block):
        shutil.copy(cohort / "datalist.json", data / "datalist.json")
    tasks = ("1p19q", "idh", "grade")
    with open(data / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", *tasks])
        for case in (c for split in ("training", "validation", "testing") for c in splits[split]):
            if any(t in case for t in tasks):
                writer.writerow([case["case_id"], *(case.get(t, "") for t in tasks)])
    for case in splits["testing"]:
        (data / "new_cases" / case["case_id"]).mkdir()
        for key in ("t1c", "t2w"):
            (data / "new_cases" / case["case_id"] / f"{key}.nii.gz").symlink_to(cohort / case[key])
    return data


def block_ids() -> list[str]:
    ids: list[str] = []
    for heading, _ in BLOCKS:
        ids.append(heading if heading not in ids else f"{heading}-{sum(i.startswith(heading) for i in ids) + 1}")
    return ids


# ---- the tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [b for _, b in BLOCKS], ids=block_ids())
def test_card_block_runs(block, after_demo, cohort, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(after_demo, repo, symlinks=True)
    run_block(block, repo, data_folder(tmp_path, cohort, block))


def test_card_shows_every_workflow_and_demo_sh_runs_what_the_card_says():
    kinds = {classify(tokens) for _, block in BLOCKS for tokens in block}
    assert {"demo", "train", "torchrun", "eval", "infer", "ckpt_export", "scripts.ablation",
            "scripts.prepare_datalist"} <= kinds
    card = [tokens for _, block in BLOCKS for tokens in block]
    demo = demo_sh_commands()
    assert {"train", "eval"} <= {classify(t) for t in demo}
    assert next(t for t in demo if classify(t) == "train") in card  # the card's demo training is demo.sh's


@pytest.mark.parametrize("line, message", [
    ("""python -m monai.bundle run training --config_file "['configs/train.yaml','configs/demoo.yaml']" """,
     "demoo.yaml"),
    ("python -m monai.bundle run evaluating --val_split testing --config_file "
     """"['configs/train.yaml','configs/evaluate.yaml','configs/demo.yaml']" --network_def#pooling avg""",
     'network_def#pooling: checkpoint "max" vs this run "avg"'),
    ("python -m scripts.prepare_datalist --check /data/datalist.jsn", "datalist.jsn"),
    ("python -m monai.bundle run training --config_file configs/train.yaml --datset_dir /data", "no id ['datset_dir']"),
    ("python -m scripts.ablation --strategies equal --seeds 0 --epoch 1", "no id ['epoch']"),
], ids=["misspelt-config", "other-settings-than-the-model", "missing-file", "misspelt-option", "misspelt-override"])
def test_a_wrong_command_fails(line, message, after_demo, cohort, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(after_demo, repo, symlinks=True)
    block = commands(line)
    with pytest.raises(Exception) as err:
        run_block(block, repo, data_folder(tmp_path, cohort, block))
    chain, exc = [], err.value
    while exc is not None and len(chain) < 20:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any(message in m for m in chain), chain


@pytest.mark.parametrize("line", [
    "python -m scripts.prepare_datalst --check /data/datalist.json",     # no such module
    "pip install mlflow",                                                # not one of the bundle's entry points
    "python -m monai.bundle run training --config_file configs/train.yaml && echo done",
    "OMP_NUM_THREADS=1 python -m monai.bundle run training --config_file configs/train.yaml",
    "python -m monai.bundle run --config_file configs/metadata.json",
    "python -m monai.bundle verify_metadata --meta_file configs/metadata.json",
])
def test_a_command_without_a_runner_fails(line):
    with pytest.raises(UnknownCommand, match="this test cannot run"):
        run_block(commands(line), Path("/nonexistent"), Path("/nonexistent"))


def test_comments_continuations_and_placeholders(tmp_path):
    block = commands("python -m x --a 1 \\\n    --network_def#pooling max   # a comment\n# only a comment\n"
                     "torchrun --nproc_per_node=N --b '#not a comment' --c /data/x --d=/data --e /database\n")
    assert block == [["python", "-m", "x", "--a", "1", "--network_def#pooling", "max"],
                     ["torchrun", "--nproc_per_node=N", "--b", "#not a comment", "--c", "/data/x", "--d=/data",
                      "--e", "/database"]]
    assert substitute(block[1], tmp_path) == ["torchrun", "--nproc_per_node=2", "--b", "#not a comment", "--c",
                                              str(tmp_path / "x"), f"--d={tmp_path}", "--e", "/database"]
    args = ["--epochs", "100", "--seeds=0,1"]
    set_option(args, "epochs", 1)
    set_option(args, "seeds", "0")
    set_option(args, "pixdim", [8.0, 8.0, 8.0])
    assert args == ["--epochs", "1", "--seeds=0", "--pixdim", "[8.0, 8.0, 8.0]"]
