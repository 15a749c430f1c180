"""The command line's shape (issue 15, item 14): one spelling per concept (old spellings kept as
hidden aliases), an example in every command's help, one-line usage errors, -v a plain flag."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from hfs.cli import app

# every registered command, so a command added later is held to the same rule
COMMANDS = [c.name for c in app.registered_commands]


def hfs(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfs", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def help_of(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def test_all_commands_are_listed():
    assert {"train", "serve-params", "bench-fc", "make-synthetic"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example(command):
    text = help_of(command)
    assert "Example" in text and f"hfs {command}" in text, text


@pytest.mark.parametrize("command, new, old", [
    ("make-synthetic", "--num-classes", "--classes"),
    ("bench-fc", "--num-classes", "--classes"),
    ("bench-fc", "--batch-size", "--batch"),
    ("bench-paramserver", "--json", "--out"),
    ("convert", "--num-workers", "--workers"),
    ("bench-loader", "--num-workers", "--workers"),
])
def test_one_spelling_per_concept_old_one_hidden(command, new, old):
    text = help_of(command)
    assert f"{new} " in text
    assert f"{old} " not in text


def test_old_spellings_still_work(tmp_path):
    proc = hfs("make-synthetic", "--out", str(tmp_path / "s"), "--classes", "2", "--images-per-class", "1",
               "--image-size", "8")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s" / "train.rec").is_file()


def test_new_and_old_spelling_together_is_an_error(tmp_path):
    proc = hfs("make-synthetic", "--out", str(tmp_path / "s"), "--classes", "2", "--num-classes", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --num-classes given twice (also as --classes)"]


@pytest.mark.parametrize("args, starts", [
    (["train", "--bogus"], "error: no such option: --bogus"),
    (["bench-fc", "--num-classes", "x"], "error: invalid value for '--num-classes'"),
    (["make-synthetic", "--num-classes", "2"], "error: missing option '--out'"),
    (["no-such-command"], "error: no such command"),
])
def test_usage_errors_are_one_line(args, starts):
    proc = hfs(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts), proc.stderr
    assert f"hfs {args[0]} --help" in lines[0] or args[0] == "no-such-command"


def test_verbose_is_a_flag():
    text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "250"}).output
    line = next(l for l in text.splitlines() if "--verbose" in l)
    assert "int" not in line.lower(), line
    proc = hfs("-v", "show-config", "--set", "train.max_steps=3")
    assert proc.returncode == 0 and "max_steps: 3" in proc.stdout, proc.stderr
