"""vit.memory: the malloc settings the commands and benchmarks apply."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from vit.memory import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_glibc_takes_the_settings():
    # in a child process: the settings are process-wide
    code = "from vit.memory import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_without_a_c_library_nothing_happens(monkeypatch):
    def missing(*args, **kwargs):
        raise OSError("no libc here")

    monkeypatch.setattr("ctypes.CDLL", missing)
    assert keep_freed_memory() is False
