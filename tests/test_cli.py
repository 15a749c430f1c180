import subprocess
import sys

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
