"""The README quickstart writes nothing that git would pick up (issue 15, item 16)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def quickstart_outputs() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    outs = re.findall(r"--out(?:-folder)? (\S+)", block) + re.findall(r"train\.output_dir=(\S+)", block)
    assert len(outs) >= 4, block
    return outs


def test_quickstart_outputs_are_git_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in quickstart_outputs():
        probe = f"{path}/x" if "." not in Path(path).name else path
        proc = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO)
        assert proc.returncode == 0, f"{path} (written by the README quickstart) is not in .gitignore"
