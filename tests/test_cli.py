import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hfs.cli import app


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "show-config" in result.output


def test_show_config_and_overrides():
    result = CliRunner().invoke(app, ["show-config", "--set", "train.max_steps=3"])
    assert result.exit_code == 0
    assert "max_steps: 3" in result.output


def test_bad_key_is_one_line_and_nonzero():
    proc = subprocess.run([sys.executable, "-m", "hfs", "show-config", "--set", "train.max_step=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"]


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from typer.testing import CliRunner; from hfs.cli import app; "
            "CliRunner().invoke(app, ['--help']); "
            "print(','.join(m for m in ('torch', 'zmq', 'annoy', 'hnswlib', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_one_line_unwraps_dataloader_worker_errors_and_oserrors():
    from hfs.cli import one_line
    from hfs.utils.errors import HfsError

    wrapped = HfsError("Caught HfsError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                       '  File "x.py", line 1, in f\nhfs.utils.errors.HfsError: image a/b.jpg in list.txt line 3: missing')
    assert one_line(wrapped) == "image a/b.jpg in list.txt line 3: missing"
    assert one_line(PermissionError(13, "Permission denied", "/ro/out.npy")) == "/ro/out.npy: Permission denied"
    assert one_line(HfsError("plain")) == "plain"


def test_unwritable_output_is_one_line_not_a_traceback(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "synth").write_text("a file where a folder must go")
    proc = subprocess.run([sys.executable, "-m", "hfs", "make-synthetic", "--out", str(ro / "synth" / "x"),
                           "--classes", "2", "--images-per-class", "1", "--image-size", "8"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith("synth is a file, not a folder"), proc.stderr


def test_print_config_on_a_real_command_shows_overrides_and_does_no_work(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--sampled", "--set", f"train.output_dir={out}",
                                      "--set", "train.max_steps=7", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "max_steps: 7" in result.output and "mode: sampled" in result.output
    assert not out.exists()


def test_show_config_keys_lists_every_key():
    from hfs.config import describe_keys

    result = CliRunner().invoke(app, ["show-config", "--keys"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.splitlines() if line.strip()}
    assert listed == {key for key, *_ in describe_keys()}


def test_show_config_keys_markdown_is_the_committed_reference_page():
    from hfs.default_config import REFERENCE_COMMAND, REFERENCE_PATH

    result = CliRunner().invoke(app, ["show-config", "--keys", "--format", "markdown"])
    assert result.exit_code == 0, result.output
    page = Path(__file__).resolve().parents[1] / REFERENCE_PATH
    assert result.output == page.read_text(), f"regenerate: {REFERENCE_COMMAND}"


@pytest.mark.parametrize("args, fragment", [
    (["--format", "markdown"], "--format markdown goes with --keys"),
    (["--keys", "--format", "html"], "--format 'html': choose text or markdown"),
])
def test_show_config_format_errors(args, fragment):
    proc = subprocess.run([sys.executable, "-m", "hfs", "show-config", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and fragment in proc.stderr
