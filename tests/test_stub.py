"""The hand-written kernel stub (_kernel.pyi) matches the compiled module (mypy.stubtest)."""

import os
import subprocess
import sys


def test_kernel_stub_matches_the_extension():
    allow = os.path.join(os.path.dirname(__file__), "stubtest_allowlist.txt")
    out = subprocess.run([sys.executable, "-m", "mypy.stubtest", "segcore._kernel",
                          "--allowlist", allow], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
