"""The HTTP server, driven with real HTTP against a real ``segcore serve`` process.

Each test starts its own server on a free 127.0.0.1 port and stops it by its pid. The engine
behaviour behind the endpoints is tested on both engines elsewhere; here the subject is the
wire: bodies, statuses, error paths, auth, the event stream, durability across restarts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import msgspec
import numpy as np
import pytest
from pyroaring import BitMap

import segcore
from segcore.synth import generate

HOUR = 3_600_000
DAY = 24 * HOUR

RULES = """\
# the shop's segments
buyers: did(purchase, 30d)
frequent: count(purchase, 90d) >= 2
carters: abandoned(add_to_cart, purchase, 1h)
swedes: trait.country == "SE"
swedish_buyers: in(swedes) and in(buyers)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``segcore serve`` subprocess on 127.0.0.1 and an HTTP client for it."""

    def __init__(self, tmp_path, *args: str, token: str | None = None,
                 rules: str | None = RULES):
        self.tmp = tmp_path
        self.args = list(args)
        self.token = token
        self.rules = None
        if rules is not None:
            self.rules = tmp_path / f"rules-{id(self)}.txt"
            self.rules.write_text(rules)
        self.proc: subprocess.Popen | None = None
        self.log = tmp_path / f"server-{id(self)}.log"

    def start(self) -> "Server":
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if k != "SEGCORE_TOKEN"}
        if self.token is not None:
            env["SEGCORE_TOKEN"] = self.token
        cmd = [sys.executable, "-m", "segcore", "serve", "--port", str(self.port),
               *self.args]
        if self.rules is not None:
            cmd += ["--rules", str(self.rules)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   + self.log.read_text())
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not come up:\n" + self.log.read_text())
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.http.close()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc = None

    # shorthands
    def get(self, path, **kw):
        return self.http.get(path, **kw)

    def post(self, path, body, **kw):
        data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        return self.http.post(path, content=data, **kw)

    def put(self, path, body, **kw):
        return self.http.put(path, content=msgspec.json.encode(body), **kw)

    def delete(self, path, **kw):
        return self.http.delete(path, **kw)

    def sizes(self) -> dict[str, int]:
        return {s["name"]: s["size"] for s in self.get("/v1/segments").json()["segments"]}

    def members(self, name: str) -> list:
        out, cursor = [], None
        while True:
            params = {"limit": 1000} | ({"cursor": cursor} if cursor else {})
            page = self.get(f"/v1/segments/{name}/members", params=params).json()
            out += page["members"]
            cursor = page["next_cursor"]
            if cursor is None:
                return out


@pytest.fixture
def serve(tmp_path):
    started: list[Server] = []

    def start(*args: str, **kw) -> Server:
        s = Server(tmp_path, *args, **kw).start()
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc is not None:
            s.proc.kill()
            s.proc.wait()


def _err(resp, status: int, type_: str, path=None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == type_, err
    if path is not None:
        assert err.get("path") == path, err
    return err


def _metric(server: Server, name: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


# ------------------------------------------------------------------ the main path
def test_ingest_transitions_members_forget(serve):
    s = serve()
    r = s.post("/v1/events", [
        {"user": 1, "event": "purchase", "ts": 1_000, "props": {"amount": 9.5}},
        {"user": 1, "event": "purchase", "ts": "1970-01-01T00:00:02Z"},
        {"user": "ann", "event": "add_to_cart", "ts": 3_000, "id": "m-1"},
        {"user": "ann", "event": "add_to_cart", "ts": 3_000, "id": "m-1"},
    ])
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 3, "duplicates": 1, "transitions": [
        {"user": 1, "segment": "buyers", "entered": True, "ts": 1_000},
        {"user": 1, "segment": "frequent", "entered": True, "ts": 2_000}]}
    # time alone: the cart is abandoned one hour after the add-to-cart, exactly
    r = s.post("/v1/advance", {"ts": 3_000 + 2 * HOUR})
    assert r.json() == {"now": 3_000 + 2 * HOUR, "transitions": [
        {"user": "ann", "segment": "carters", "entered": True, "ts": 3_000 + HOUR}]}
    assert s.members("carters") == ["ann"]
    assert s.get("/v1/users/ann/segments").json() == {"user": "ann", "segments": ["carters"]}
    assert s.get("/v1/users/1/segments").json() == {"user": 1,
                                                    "segments": ["buyers", "frequent"]}
    assert s.get("/v1/users/1/segments", params={"id_type": "string"}).json() == {
        "user": "1", "segments": []}
    assert s.get("/v1/segments/buyers/size").json() == {"name": "buyers", "size": 1}
    assert s.post("/v1/query", {"expr": "buyers | carters"}).json() == {
        "size": 2, "members": [1, "ann"], "next_cursor": None}
    assert s.post("/v1/query", {"expr": "buyers & ~frequent"}).json()["size"] == 0
    # traits move users too
    r = s.put("/v1/users/1/traits", {"country": "SE"})
    assert r.json() == {"user": 1, "transitions": [
        {"user": 1, "segment": "swedes", "entered": True, "ts": 3_000 + 2 * HOUR},
        {"user": 1, "segment": "swedish_buyers", "entered": True, "ts": 3_000 + 2 * HOUR}]}
    # forget: gone from every segment; a second forget knows nothing
    assert s.delete("/v1/users/ann").json() == {"user": "ann", "forgotten": True}
    assert s.members("carters") == []
    assert s.get("/v1/users/ann/segments").json()["segments"] == []
    assert s.delete("/v1/users/ann").json() == {"user": "ann", "forgotten": False}
    assert s.sizes() == {"buyers": 1, "frequent": 1, "carters": 0, "swedes": 1,
                         "swedish_buyers": 1}
    # 30 days after the last purchase the buyer leaves, by time alone
    r = s.post("/v1/advance", {"ts": "1970-02-01T00:00:00Z"})
    assert [(t["segment"], t["entered"], t["ts"]) for t in r.json()["transitions"]] == [
        ("buyers", False, 2_000 + 30 * DAY), ("swedish_buyers", False, 2_000 + 30 * DAY)]


def test_scores_and_rules_using_them(serve):
    s = serve(rules="at_risk: score.churn >= 0.7\n")
    assert s.put("/v1/users/7/scores", {"churn": 0.9}).json()["transitions"] == [
        {"user": 7, "segment": "at_risk", "entered": True, "ts": 0}]
    err = _err(s.put("/v1/users/7/scores", {"churn": "high"}), 422, "invalid_body")
    assert "Expected `float | null`, got `str`" in err["message"]
    assert s.put("/v1/users/7/scores", {"churn": None}).json()["transitions"][0][
        "entered"] is False


# ------------------------------------------------------------------ bad input
def test_malformed_batches_are_422_with_the_path_and_change_nothing(serve):
    s = serve()
    ok = {"user": 1, "event": "purchase", "ts": 1_000}
    cases = [
        ([ok, {"user": True, "event": "x", "ts": 1}], "$[1].user", "got `bool`"),
        ([ok, ok, {"user": 2, "event": "x", "ts": "yesterday"}], "$[2].ts",
         "not an ISO 8601 time"),
        ([ok, {"user": 2, "event": "x", "ts": -1}], "$[1].ts", "out of range"),
        ([ok, {"user": 2, "event": "", "ts": 1}], "$[1].event", "non-empty string"),
        ([{"user": 2, "ts": 1}], "$[0]", "missing required field `event`"),
        ([{"user": 2, "event": "x", "ts": 1, "colour": "red"}], "$[0]", "unknown field"),
        ([ok, {"user": 2, "event": "x", "ts": 1, "props": {"a": [1]}}], "$[1].props.a",
         "must be a string, number, bool or null"),
        ([{"user": 2 ** 32, "event": "x", "ts": 1}], "$[0].user", "[0, 2**32)"),
        ({"user": 1}, "$", "Expected `array`"),
    ]
    for body, path, text in cases:
        err = _err(s.post("/v1/events", body), 422, "invalid_event", path)
        assert text in err["message"], (body, err)
    err = _err(s.post("/v1/events", b'[{"user": 1, "event": "purchase", '), 422,
               "invalid_event", "$")
    assert err["message"].startswith("invalid JSON")
    # nothing of any rejected batch was applied
    assert s.get("/healthz").json()["now"] == 0
    assert set(s.sizes().values()) == {0}
    assert _metric(s, "segcore_events_accepted_total") == 0
    assert _metric(s, "segcore_events_rejected_total") == 14     # rows of those arrays
    # other bodies: the path of the bad field, and 404/405 as JSON errors
    _err(s.post("/v1/advance", {"ts": 1.5}), 422, "invalid_body", "$.ts")
    _err(s.post("/v1/advance", {"when": 1}), 422, "invalid_body", "$")
    _err(s.post("/v1/advance", b"nope"), 422, "invalid_json", "$")
    _err(s.post("/v1/query", {"expr": "buyers &"}), 422, "invalid_query", "$.expr")
    _err(s.post("/v1/query", {"expr": "buyers", "limit": 0}), 422, "invalid_body", "$.limit")
    _err(s.get("/v1/segments/buyers/members", params={"cursor": "x"}), 422,
         "invalid_request", "cursor")
    _err(s.get("/v1/segments/buyers/members", params={"limit": "-1"}), 422,
         "invalid_request", "limit")
    _err(s.get("/v1/users/ann/segments", params={"id_type": "int"}), 422, "invalid_request")
    _err(s.get("/v1/nowhere"), 404, "not_found")
    r = s.http.patch("/v1/segments/buyers")
    _err(r, 405, "method_not_allowed")
    assert set(r.headers["allow"].split(", ")) == {"PUT", "DELETE"}
    assert s.post("/v1/events", [ok]).json()["accepted"] == 1


def test_oversized_bodies_are_413_and_change_nothing(serve):
    s = serve("--max-body", "2000")
    batch = [{"user": i, "event": "purchase", "ts": 1_000 + i} for i in range(60)]
    body = msgspec.json.encode(batch)
    assert len(body) > 2000
    err = _err(s.post("/v1/events", body), 413, "payload_too_large")
    assert "over the limit of 2,000" in err["message"]

    def chunks():                       # no Content-Length: counted while reading
        for i in range(0, len(body), 500):
            yield body[i:i + 500]
    _err(s.http.post("/v1/events", content=chunks()), 413, "payload_too_large")
    assert s.get("/healthz").json()["now"] == 0
    assert set(s.sizes().values()) == {0}
    r = s.post("/v1/events", batch[:20])
    assert r.status_code == 200 and r.json()["accepted"] == 20
    assert s.sizes()["buyers"] == 20


def test_hostile_input_is_4xx_and_changes_nothing(serve):
    s = serve()
    s.post("/v1/events", [{"user": 1, "event": "purchase", "ts": 1_000, "id": "a"}])
    before = (s.get("/v1/segments").json(), s.get("/healthz").json())
    deep = b"[" * 5_000 + b"]" * 5_000
    _err(s.post("/v1/events", b'[{"user": 2, "event": "x", "ts": 2, "props": {"a": '
                + deep + b"}}]"), 422, "invalid_event")
    err = _err(s.post("/v1/query", {"expr": "(" * 3_000 + "buyers" + ")" * 3_000}), 422,
               "invalid_query")
    assert "nested too deeply" in err["message"]
    _err(s.post("/v1/query", {"expr": "~" * 100_000 + "buyers"}), 422, "invalid_query")
    err = _err(s.put("/v1/segments/x", {"rule": "not " * 5_000 + "seen"}), 422,
               "invalid_rule")
    assert "nested too deeply" in err["message"]
    _err(s.put("/v1/users/1/traits", {"level": 2 ** 64}), 422, "invalid_body")
    _err(s.post("/v1/events", [{"user": 2, "event": "x", "ts": 2, "id": 2 ** 64}]), 422,
         "invalid_event", "$[0].id")
    _err(s.put("/v1/triggers/t", {"segment": "buyers", "max_per": [2 ** 40, "1d"]}), 422,
         "invalid_body")
    for q in ({"limit": "9" * 5_000}, {"cursor": "9" * 5_000}, {"limit": "²"},
              {"cursor": "１２"}):
        _err(s.get("/v1/segments/buyers/members", params=q), 422, "invalid_request")
    _err(s.post("/v1/query", {"expr": "buyers", "cursor": "9" * 5_000}), 422, "invalid_body",
         "$.cursor")
    assert s.get("/v1/segments/buyers/members",
                 headers={"Accept": "application/octet-stream;q=0, application/json"}
                 ).json()["members"] == [1]
    s.post("/v1/events", [{"user": 9, "event": "purchase", "ts": 1_000}])
    for bad in ("x-" + "9" * 5_000, "abc-²".encode("latin-1"), "-", "", "9" * 30):
        with s.http.stream("GET", "/v1/stream", timeout=10,
                           headers={"Last-Event-ID": bad}) as r:
            assert r.status_code == 200
            first = _Sse(r).next()
            assert first["event"] in ("gap", "transition"), first
    s.delete("/v1/users/9")
    assert (s.get("/v1/segments").json(), s.get("/healthz").json()) == before
    assert s.proc.poll() is None


# ------------------------------------------------------------------ auth
def test_auth_with_a_token(serve):
    s = serve(token="s3cret")
    anon = httpx.Client(base_url=s.url)
    assert anon.get("/healthz").status_code == 200
    for method, path in [("GET", "/v1/segments"), ("POST", "/v1/events"),
                         ("GET", "/metrics"), ("GET", "/openapi.json"),
                         ("DELETE", "/v1/users/1"), ("GET", "/v1/stream")]:
        r = anon.request(method, path, content=b"[]")
        err = _err(r, 401, "unauthorized")
        assert err["message"] == "missing `Authorization: Bearer <token>` header"
        assert r.headers["www-authenticate"] == "Bearer"
    for bad in ["Bearer s3cre", "Bearer  s3cret", "Bearer s3cret2", "bearer s3cret", "Basic s3cret", "s3cret"]:
        r = anon.get("/v1/segments", headers={"Authorization": bad})
        assert _err(r, 401, "unauthorized")["message"] == "invalid token"
    r = anon.post("/v1/events", content=b'[{"user": 1, "event": "purchase", "ts": 5}]',
                  headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert s.get("/healthz").json()["now"] == 0          # nothing was applied
    assert s.post("/v1/events", [{"user": 1, "event": "purchase", "ts": 5}]).status_code == 200
    anon.close()


def test_refuses_a_public_address_without_a_token(tmp_path):
    rules = tmp_path / "rules.txt"
    rules.write_text(RULES)
    env = {k: v for k, v in os.environ.items() if k != "SEGCORE_TOKEN"}
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.com"):
        p = subprocess.run([sys.executable, "-m", "segcore", "serve", "--host", host,
                            "--port", str(_free_port()), "--rules", str(rules)],
                           env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, p.stderr
        assert f"refusing to bind {host} without a token" in p.stderr
        assert "SEGCORE_TOKEN" in p.stderr


def test_serve_reports_bad_rules_and_missing_files(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("ok: seen\nbroken: count(purchase, 9x) >= 1\n")
    p = subprocess.run([sys.executable, "-m", "segcore", "serve", "--rules", str(bad),
                        "--port", str(_free_port())], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1
    assert f"{bad}:2:" in p.stderr
    p = subprocess.run([sys.executable, "-m", "segcore", "serve", "--port",
                        str(_free_port())], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "no rules" in p.stderr


# ------------------------------------------------------------------ segments
def test_segment_edits(serve):
    s = serve()
    s.post("/v1/events", [{"user": 1, "event": "purchase", "ts": 1_000},
                          {"user": 2, "event": "page_view", "ts": 2_000}])
    s.put("/v1/users/2/traits", {"country": "NO"})
    s.put("/v1/users/1/traits", {"country": "SE"})
    # a new segment is back-filled from kept state at once
    r = s.put("/v1/segments/nordic", {"rule": 'trait.country in ["SE", "NO"]'})
    assert r.status_code == 201
    assert r.json() == {"name": "nordic", "rule": 'trait.country in ["SE", "NO"]',
                        "size": 2, "created": True, "transitions": [
                            {"user": 1, "segment": "nordic", "entered": True, "ts": 2_000},
                            {"user": 2, "segment": "nordic", "entered": True, "ts": 2_000}]}
    before = s.get("/v1/segments").json()
    err = _err(s.put("/v1/segments/nordic", {"rule": 'trait.country in ["SE", "NO"'}), 422,
               "invalid_rule", "$.rule")
    assert (err["line"], err["column"]) == (1, 29)
    err = _err(s.put("/v1/segments/x", {"rule": "cnt(purchase) > 1"}), 422, "invalid_rule")
    assert "did you mean `count`" in err["message"]
    _err(s.put("/v1/segments/x", {"rules": "seen"}), 422, "invalid_body", "$")
    assert s.get("/v1/segments").json() == before          # nothing changed
    # replace: who moves is reported
    r = s.put("/v1/segments/nordic", {"rule": 'trait.country == "NO"'})
    assert r.status_code == 200
    assert r.json()["transitions"] == [
        {"user": 1, "segment": "nordic", "entered": False, "ts": 2_000}]
    assert r.json()["created"] is False
    # delete: referenced segments refuse, unknown ones are 404 with a suggestion
    err = _err(s.delete("/v1/segments/swedes"), 409, "conflict")
    assert "referenced by `swedish_buyers`" in err["message"]
    assert s.delete("/v1/segments/nordic").status_code == 204
    err = _err(s.get("/v1/segments/nordic/size"), 404, "not_found", "name")
    err = _err(s.get("/v1/segments/buyer/members"), 404, "not_found")
    assert "did you mean `buyers`" in err["message"]
    assert [x["name"] for x in s.get("/v1/segments").json()["segments"]] == [
        "buyers", "frequent", "carters", "swedes", "swedish_buyers"]


def test_members_pages_and_portable_bitmap(serve):
    s = serve()
    users: list = list(range(0, 5_000, 2)) + [f"u{i}" for i in range(300)]
    for i in range(0, len(users), 1_000):
        r = s.post("/v1/events", [{"user": u, "event": "purchase", "ts": 1_000}
                                  for u in users[i:i + 1_000]])
        assert r.status_code == 200
    pages, cursor = [], None
    while True:
        params = {"limit": 700} | ({"cursor": cursor} if cursor else {})
        page = s.get("/v1/segments/buyers/members", params=params).json()
        assert page["size"] == len(users)
        pages.append(page["members"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    flat = [u for p in pages for u in p]
    assert len(flat) == len(users) and set(map(str, flat)) == set(map(str, users))
    assert len(pages) == -(-len(users) // 700)
    assert all(len(p) == 700 for p in pages[:-1])
    r = s.get("/v1/segments/buyers/members",
              headers={"Accept": "application/octet-stream"})
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-segcore-size"] == str(len(users))
    bm = BitMap.deserialize(r.content)
    assert set(bm) >= set(range(0, 5_000, 2)) and len(bm) == len(users)
    # string users are numbered downward from 2**32 - 1
    assert max(bm) == 2 ** 32 - 1
    r = s.post("/v1/query", {"expr": "buyers - frequent"},
               headers={"Accept": "application/octet-stream"})
    assert BitMap.deserialize(r.content) == bm


# ------------------------------------------------------------------ the event stream
class _Sse:
    """Reads Server-Sent Events from an open streaming response."""

    def __init__(self, resp):
        self.lines = resp.iter_lines()

    def next(self) -> dict:
        ev: dict = {}
        for line in self.lines:
            if not line:
                if "data" in ev or ev.get("event"):
                    return ev
                ev = {}
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            if key == "data":
                ev["data"] = msgspec.json.decode(value)
            elif key in ("id", "event"):
                ev[key] = value
        raise AssertionError("stream ended")

    def take(self, n: int) -> list[dict]:
        return [self.next() for _ in range(n)]


def test_stream_transitions_firings_and_resume(serve):
    s = serve("--stream-buffer", "6")
    assert s.put("/v1/triggers/thank_you", {"segment": "buyers", "channel": "email"}
                 ).status_code == 201
    _err(s.put("/v1/triggers/thank_you", {"segment": "buyers"}), 409, "conflict")
    _err(s.put("/v1/triggers/t2", {"segment": "nope"}), 422, "invalid_body", "$.segment")
    err = _err(s.put("/v1/triggers/t2", {"segment": "buyers", "after": "soon"}), 422,
               "invalid_body", "$")
    assert "`soon` is not a duration" in err["message"]
    assert s.get("/v1/triggers").json()["triggers"][0]["channel"] == "email"
    with s.http.stream("GET", "/v1/stream", timeout=10) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        live = _Sse(resp)
        s.post("/v1/events", [{"user": 1, "event": "purchase", "ts": 1_000},
                              {"user": 1, "event": "purchase", "ts": 2_000}])
        got = live.take(3)
    assert [(e["event"], e["data"]["segment"], e["data"]["ts"]) for e in got] == [
        ("transition", "buyers", 1_000), ("transition", "frequent", 2_000),
        ("firing", "buyers", 1_000)]
    assert got[2]["data"]["trigger"] == "thank_you" and got[2]["data"]["delivered"] is True
    boot = got[0]["id"].split("-")[0]
    assert [e["id"] for e in got] == [f"{boot}-1", f"{boot}-2", f"{boot}-3"]
    # resume after the first: the two after it, from the buffer
    with s.http.stream("GET", "/v1/stream", timeout=10, headers={"Last-Event-ID": got[0]["id"]}) as r:
        again = _Sse(r).take(2)
    assert again == got[1:]
    # overflow the 6-event buffer, then resume from an evicted id: a gap, then the oldest
    s.post("/v1/events", [{"user": u, "event": "purchase", "ts": 3_000} for u in (2, 3, 4)])
    with s.http.stream("GET", "/v1/stream", timeout=10, headers={"Last-Event-ID": got[0]["id"]}) as r:
        sse = _Sse(r)
        gap = sse.next()
        rest = sse.take(6)
    assert gap["event"] == "gap"
    assert "no longer buffered" in gap["data"]["reason"]
    assert [e["id"] for e in rest] == [f"{boot}-{i}" for i in range(4, 10)]
    # an id from another server process (or garbage) is a gap too, never a silent skip
    with s.http.stream("GET", "/v1/stream", timeout=10, headers={"Last-Event-ID": "0000-3"}) as r:
        sse = _Sse(r)
        gap = sse.next()
        first = sse.next()
    assert gap["event"] == "gap" and "not from this server process" in gap["data"]["reason"]
    assert first["id"] == f"{boot}-4"
    # forget takes the user out of the buffer too
    s.delete("/v1/users/2")
    with s.http.stream("GET", "/v1/stream", timeout=10, headers={"Last-Event-ID": f"{boot}-3"}) as r:
        sse = _Sse(r)
        left = sse.take(4)
    assert 2 not in {e["data"]["user"] for e in left}


# ------------------------------------------------------------------ durability
def _workload_batches():
    w = generate(n_users=300, n_events=4_000, days=20, seed=3)
    rows = [{"user": int(u), "event": w.event_types[c], "ts": int(t)}
            for u, c, t in zip(w.user, w.event_code, w.ts)]
    return [rows[i:i + 500] for i in range(0, len(rows), 500)]


def _state(eng_or_server) -> dict:
    if isinstance(eng_or_server, Server):
        return {name: sorted(eng_or_server.members(name), key=str)
                for name in eng_or_server.sizes()}
    return {name: sorted((eng_or_server.user_id(u) for u in eng_or_server.members(name)),
                         key=str) for name in eng_or_server.segments}


def test_restart_with_a_data_dir_loses_nothing_acknowledged(serve, tmp_path):
    data = tmp_path / "data"
    batches = _workload_batches()
    oracle = segcore.Engine()
    oracle.add_segments(segcore.rules.load_rules_file(RULES))
    s = serve("--data-dir", str(data))
    for b in batches[:5]:
        assert s.post("/v1/events", b).status_code == 200
        oracle.track_json(msgspec.json.encode(b))
    assert s.put("/v1/segments/nordic", {"rule": 'trait.country == "SE"'}).status_code == 201
    oracle.add_segment("nordic", 'trait.country == "SE"')
    s.put("/v1/users/5/traits", {"country": "SE"})
    oracle.set_traits(5, {"country": "SE"})
    assert s.put("/v1/triggers/hello", {"segment": "buyers"}).status_code == 201
    expected = _state(oracle)
    assert _state(s) == expected
    s.stop(signal.SIGKILL)                      # no goodbye: only the log survives
    s = serve("--data-dir", str(data))
    assert _state(s) == expected
    assert s.get("/healthz").json()["now"] == oracle.now
    assert [t["name"] for t in s.get("/v1/triggers").json()["triggers"]] == ["hello"]
    for b in batches[5:]:
        assert s.post("/v1/events", b).status_code == 200
        oracle.track_json(msgspec.json.encode(b))
    assert s.post("/v1/advance", {"ts": oracle.now + 40 * DAY}).status_code == 200
    oracle.advance(oracle.now + 40 * DAY)
    expected = _state(oracle)
    assert _state(s) == expected
    before = sorted(os.listdir(data))
    assert s.stop(signal.SIGTERM) == 0          # a clean stop checkpoints
    assert "checkpointed" in s.log.read_text()
    n = max(int(f.split("-")[1].split(".")[0]) for f in before) + 1
    assert sorted(os.listdir(data)) == [f"snapshot-{n}.snap", f"wal-{n}.log"]
    assert os.path.getsize(data / f"wal-{n}.log") == 0
    s = serve("--data-dir", str(data), rules=None)      # the data dir alone suffices
    assert _state(s) == expected
    s.stop()
    # a rules file with a new segment referencing another new one defined after it
    s = serve("--data-dir", str(data), rules=RULES + "a: in(b)\nb: in(buyers)\n")
    assert s.sizes()["a"] == s.sizes()["b"] == len(expected["buyers"])


# ------------------------------------------------------------------ wall-clock mode
def test_wall_clock_mode_moves_users_by_time_alone(serve):
    s = serve("--clock", "wall", "--tick", "0.1",
              rules="carters: abandoned(add_to_cart, purchase, 1s)\n")
    t0 = int(time.time() * 1000)
    r = s.post("/v1/events", [{"user": "ann", "event": "add_to_cart", "ts": t0}])
    assert r.json()["transitions"] == []
    # reads between the ticks catch up with the clock too; what they see is not lost
    while time.time() * 1000 < t0 + 1_300:
        s.get("/healthz")
        s.get("/v1/segments")
    with s.http.stream("GET", "/v1/stream", timeout=10, headers={"Last-Event-ID": "x-0"}) as resp:
        sse = _Sse(resp)
        ev = sse.next()
        while ev["event"] == "gap":
            ev = sse.next()
    assert ev["data"] == {"user": "ann", "segment": "carters", "entered": True,
                          "ts": t0 + 1_000}
    assert s.get("/v1/users/ann/segments").json()["segments"] == ["carters"]
    assert 'segcore_transitions_total{direction="enter",segment="carters"} 1.0' in \
        s.get("/metrics").text.splitlines()
    _err(s.post("/v1/advance", {"ts": t0 + 5_000}), 409, "conflict", "ts")
    too_late = t0 + 3_600_000
    _err(s.post("/v1/events", [{"user": "bo", "event": "x", "ts": too_late}]), 422,
         "invalid_event", "$[0].ts")


# ------------------------------------------------------------------ metrics, openapi
def test_metrics_and_openapi(serve):
    s = serve()
    s.post("/v1/events", [{"user": 1, "event": "purchase", "ts": 1_000},
                          {"user": 2, "event": "page_view", "ts": 1_500, "id": 7},
                          {"user": 2, "event": "page_view", "ts": 1_500, "id": 7}])
    text = s.get("/metrics").text
    assert s.get("/metrics").headers["content-type"].startswith("text/plain")
    for line in ["segcore_events_accepted_total 2.0",
                 "segcore_events_duplicate_total 1.0",
                 "segcore_ingest_seconds_count 1.0",
                 'segcore_transitions_total{direction="enter",segment="buyers"} 1.0',
                 'segcore_segment_size{segment="buyers"} 1.0',
                 'segcore_segment_size{segment="carters"} 0.0',
                 "segcore_users 2.0", "segcore_now 1500.0"]:
        assert line in text.splitlines(), line
    spec = s.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == {
        "/healthz", "/metrics", "/v1/events", "/v1/advance", "/v1/segments",
        "/v1/segments/{name}", "/v1/segments/{name}/size", "/v1/segments/{name}/members",
        "/v1/query", "/v1/users/{user}/segments", "/v1/users/{user}/traits",
        "/v1/users/{user}/scores", "/v1/users/{user}", "/v1/triggers",
        "/v1/triggers/{name}", "/v1/stream"}
    assert spec["components"]["schemas"]["EventIn"]["required"] == ["user", "event", "ts"]


def test_schemathesis_finds_no_server_error(serve):
    st = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")
    assert st, "schemathesis is a test dependency"
    s = serve(token="fuzz")
    s.post("/v1/events", [{"user": i, "event": "purchase", "ts": 1_000 + i}
                          for i in range(20)])
    p = subprocess.run(
        [st, "run", s.url + "/openapi.json", "-H", "Authorization: Bearer fuzz",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
         "response_schema_conformance,negative_data_rejection,allow_header_conformance",
         "--max-examples", "15", "--seed", "7", "-w", "1"],
        capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    assert s.proc.poll() is None
