"""`--config=` from any directory: built-in names, configs/ paths, absolute files, a wheel."""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from apo_jax import commands
from apo_jax.config import files as config_files
from apo_jax.train import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["apo_down", "apo_zero", "apo_zero_unpaired", "dpo", "kto", "sft"]


def _parse(*args):
    fv, _ = cli._parse(["apo_jax.train", *args, "--config.num_steps=3"], "u", "a", True)
    return fv.config


def test_builtin_names_are_the_repository_configs():
    assert config_files.builtin_names() == NAMES
    assert os.path.samefile(config_files.builtin_dir(), os.path.join(REPO, "configs"))


@pytest.mark.parametrize(
    "value, loss, preset",
    [
        ("apo_zero", "apo_zero", "demo"),
        ("apo_zero:llama3_8b", "apo_zero", "llama3_8b"),
        ("configs/kto.py", "kto", "demo"),
        ("configs/dpo.py:llama3_1b", "sigmoid", "llama3_1b"),
        (None, "apo_down", "demo"),
    ],
)
def test_names_and_configs_paths_work_from_another_directory(
    monkeypatch, tmp_path, value, loss, preset
):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    c = _parse(*([f"--config={value}"] if value else []))
    assert (c.loss.name, c.preset, c.num_steps) == (loss, preset, 3)


def test_a_file_anywhere_and_a_local_configs_file_win(monkeypatch, tmp_path):
    mine = tmp_path / "my_run.py"
    mine.write_text(
        "from apo_jax.config import base_config\n\n"
        "def get_config(arg=None):\n"
        "    c = base_config('ipo', arg)\n"
        "    c.batch_size = 8\n"
        "    return c\n"
    )
    monkeypatch.chdir(tmp_path)
    assert _parse(f"--config={mine}:llama3_1b").loss.name == "ipo"
    (tmp_path / "configs").mkdir()
    shutil.copy(mine, tmp_path / "configs" / "dpo.py")  # a file at the path beats the built-in
    assert _parse("--config", "configs/dpo.py").loss.name == "ipo"


def test_an_unknown_name_lists_the_builtins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        commands.FlagError,
        match="config file nosuch does not exist: pass a "
        "built-in name .apo_down, apo_zero, apo_zero_unpaired, dpo, kto, sft",
    ):
        _parse("--config=nosuch")
    with pytest.raises(commands.FlagError, match="config file sub/apo_zero.py does not exist"):
        _parse("--config=sub/apo_zero.py")  # only configs/<name>.py falls back to a built-in


def test_help_lists_the_builtin_names(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli._parse(["apo_jax.train", "--help"], cli.TRAIN_USAGE, cli.TRAIN_ABOUT, True)
    assert e.value.code == 0
    assert f"Built-in configs: {', '.join(NAMES)}." in capsys.readouterr().out


@pytest.mark.slow
def test_a_wheel_carries_the_configs_and_names_them_from_anywhere(tmp_path):
    """`pip wheel .` (built from a copy, so the checkout gets no build/), then the wheel's files
    installed into a bare directory, which is all that is importable, name configs by name."""
    src = tmp_path / "src"
    for part in ("apo_jax", "configs"):
        shutil.copytree(
            os.path.join(REPO, part), src / part, ignore=shutil.ignore_patterns("__pycache__")
        )
    for part in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, part), src / part)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            str(src),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"apo_jax/configs/{n}.py" for n in NAMES} <= set(names)
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), wheel], check=True)
    code = (
        "from apo_jax.config import files as config_files\nfrom apo_jax.train import cli\n"
        "fv, _ = cli._parse(['x', '--config=configs/kto.py:llama3_1b'], 'u', 'a', True)\n"
        "print(config_files.builtin_dir(), fv.config.loss.name, fv.config.preset)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == [str(site / "apo_jax" / "configs"), "kto", "llama3_1b"]
