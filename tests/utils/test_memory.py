"""keep_freed_memory: glibc's thresholds raised where glibc is the allocator, a no-op elsewhere."""

import platform
import sys

from hfs.utils.memory import keep_freed_memory


def test_keep_freed_memory_says_whether_it_applied():
    applied = keep_freed_memory(trim_bytes=64 << 20, mmap_bytes=4 << 20)
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert applied is glibc
