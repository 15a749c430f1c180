"""hfs.utils.process: a benchmark's child is never left running."""

import subprocess
import sys

from hfs.utils.process import kill_if_running


def test_a_running_child_is_killed_and_reaped_a_finished_one_is_left_alone():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    kill_if_running(sleeper)
    assert sleeper.returncode is not None and sleeper.returncode != 0
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    kill_if_running(done)
    assert done.returncode == 0
