"""The memory script (``bench/memory.py``) on the chosen size, in fresh processes, so that CI
runs it too. Its figures are read by hand (docs/performance.md); this checks that it measures."""

import memory


def test_memory_script_measures_the_workload(size, capsys):
    [wide] = memory.main(["--size", size, "--repeat", "1"])
    [compact] = memory.main(["--size", size, "--repeat", "1", "--compact-rows"])
    out = capsys.readouterr().out
    assert "compact_rows=False" in out and "compact_rows=True" in out
    assert out.count("bytes/active user") >= 4 and "kernel accounting" in out
    for r in (wide, compact):
        assert r["active_users"] > 0 and r["events"] > 0
        assert 0 < r["kernel_bytes"] and 0 < r["rss_delta"]
        assert r["rss_trimmed"] is None or r["rss_trimmed"] <= r["rss_delta"] + 2**20
    assert (wide["active_users"], wide["events"]) == (compact["active_users"], compact["events"])
    # 26 counters a user on the default segments: 2 bytes each saved on every row allocated
    assert compact["kernel_bytes"] < wide["kernel_bytes"]
