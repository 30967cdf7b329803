"""The command line: rules check, replay, inspect, the demo and the bench (run in-process via
main, which returns the exit status)."""

import json

import pytest

import segcore
from segcore.cli import main

RULES = """# test rules
frequent: count(purchase, 90d) >= 2
big: sum(purchase.amount) >= 100   # money
carts: abandoned(add_to_cart, purchase, 1h)
"""


def test_rules_check(tmp_path, capsys):
    good = tmp_path / "rules.txt"
    good.write_text(RULES)
    assert main(["rules", "check", str(good)]) == 0
    assert "3 segments, all valid" in capsys.readouterr().out
    bad = tmp_path / "bad.txt"
    bad.write_text("a: seen\n\nb:  cnt(purchase) > 1\n")
    assert main(["rules", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3:5: unknown function `cnt` (did you mean `count`?)" in err
    assert main(["rules", "check", str(tmp_path / "missing.txt")]) == 2


def test_replay_then_inspect(tmp_path, capsys):
    rules = tmp_path / "rules.txt"
    rules.write_text(RULES)
    events = tmp_path / "events.jsonl"
    rows = [{"user": u, "event": "purchase", "ts": 1000 * i, "props": {"amount": 60}}
            for i, u in enumerate([1, 2, 1, "ann", "ann"])]
    rows.append({"user": 3, "event": "add_to_cart", "ts": 6000})
    events.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    snap = tmp_path / "out.snap"
    assert main(["replay", str(events), "--rules", str(rules), "--snapshot", str(snap),
                 "--batch", "2", "--until", str(6000 + 3_600_000)]) == 0
    out = capsys.readouterr().out
    assert "replayed 6 events" in out and "wrote" in out
    eng = segcore.Engine.restore(str(snap))
    assert eng.sizes() == {"frequent": 2, "big": 2, "carts": 1}
    assert main(["inspect", str(snap)]) == 0
    out = capsys.readouterr().out
    assert "checksum ok" in out and "4 users" in out and "frequent" in out
    # a bad event names its batch; a corrupt snapshot is reported, not a crash
    events.write_text('{"user": 1, "event": "x", "ts": 1}\n{"user": 1, "event": "x"}\n')
    assert main(["replay", str(events), "--rules", str(rules)]) == 1
    assert "line 1" in capsys.readouterr().err
    snap.write_bytes(snap.read_bytes()[:-5])
    assert main(["inspect", str(snap)]) == 1
    assert "checksum" in capsys.readouterr().err


def test_inspect_a_data_directory(tmp_path, capsys):
    d = tmp_path / "data"
    eng = segcore.Engine(wal=d)
    eng.add_segment("seen", "seen")
    eng.track(1, "x", ts=5)
    eng.close()
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "snapshot-0.snap + wal-0.log (2 records)" in out and "1 users" in out
    log = d / "wal-0.log"
    log.write_bytes(log.read_bytes()[:-3])
    assert main(["inspect", str(log)]) == 0
    out = capsys.readouterr().out
    assert "1 intact records" in out and "torn or corrupt tail" in out
    assert "add_segments" in out


def test_demo_once(capsys):
    assert main(["demo", "--users", "300", "--events", "3000", "--once"]) == 0
    out = capsys.readouterr().out
    assert "frequent_buyers" in out and "3,000" in out


def test_bench(capsys):
    assert main(["bench", "--users", "300", "--events", "3000", "--batch", "1000"]) == 0
    out = capsys.readouterr().out
    assert "segcore bench: 3,000 events from 300 users (seed 0), batches of 1,000" in out
    for line in ("track_many ", "track, one at a time ", "track_json ", "advance one day ",
                 "members ", "sizes "):
        assert f"\n{line}" in out, line
    assert "3 batches" in out and "p50 " in out and "p99 " in out and "3 arrays" in out


@pytest.mark.parametrize("argv", [[], ["demo"], ["bench"], ["replay"], ["inspect"], ["rules"],
                                  ["rules", "check"], ["serve"]])
def test_help_everywhere(capsys, argv):
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: segcore {' '.join(argv)}".rstrip())
    if not argv:
        for command in ("demo", "bench", "replay", "inspect", "rules", "serve"):
            assert f"  {command} " in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("segcore ")


@pytest.mark.parametrize("argv, message", [
    (["demo", "--users", "0"], "Invalid value for '--users'"),
    (["demo", "--days", "0.01"], "must be between 0.084 (2 hours) and 100000"),
    (["demo", "--delay", "-1"], "Invalid value for '--delay'"),
    (["bench", "--events", "many"], "Invalid value for '--events'"),
    (["replay", "events.jsonl"], "Missing option '--rules'"),
    (["rules", "check"], "Missing argument 'FILE'"),
    (["nonsense"], "No such command 'nonsense'"),
])
def test_usage_errors(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Usage: segcore" in err and message in err
