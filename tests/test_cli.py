"""The command line: rules check, replay, inspect and the demo (run in-process via main)."""

import json

import pytest

import segcore
from segcore.__main__ import main

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


def test_help_everywhere(capsys):
    for argv in (["--help"], ["demo", "--help"], ["replay", "--help"], ["inspect", "--help"],
                 ["rules", "check", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "replay" in capsys.readouterr().out
