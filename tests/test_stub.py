"""The hand-written stubs of the compiled modules (_kernel.pyi, _json.pyi) match them
(mypy.stubtest)."""

import os
import subprocess
import sys


def test_compiled_stubs_match_the_extensions():
    allow = os.path.join(os.path.dirname(__file__), "stubtest_allowlist.txt")
    out = subprocess.run([sys.executable, "-m", "mypy.stubtest", "segcore._kernel",
                          "segcore._json", "--allowlist", allow], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
