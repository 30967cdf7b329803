"""The memory script (``bench/memory.py``) on the chosen size, in a fresh process, so that CI
runs it too. Its figures are read by hand (docs/performance.md); this checks that it measures."""

import memory


def test_memory_script_measures_the_workload(size, capsys):
    [r] = memory.main(["--size", size, "--repeat", "1"])
    out = capsys.readouterr().out
    assert "bytes/active user" in out and "kernel accounting" in out
    assert r["active_users"] > 0 and r["events"] > 0
    assert 0 < r["kernel_bytes"] and 0 < r["rss_delta"]
    assert r["rss_trimmed"] is None or r["rss_trimmed"] <= r["rss_delta"] + 2**20
