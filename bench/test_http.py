"""The HTTP server: events/s through ``POST /v1/events`` in batches of 1,000 on one worker,
and the request latency, with the in-process ``track_json`` of the same bodies measured in the
same run (the ratio is what the HTTP layer costs).

The server is a real ``segcore serve`` process on a free 127.0.0.1 port; the client sends the
batches one after the other on one keep-alive connection. Modes: ``memory`` (no data dir),
``log`` (``--data-dir``, ``--fsync never``: a write per request) and ``log+fsync`` (the
default ``--fsync always``: an fsync per request, durable on acknowledgement).
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import msgspec
import numpy as np
import pytest

import segcore
from segcore.synth import DEFAULT_SEGMENTS
from workloads import new_engine, record

BATCH = 1_000
MAX_EVENTS = 200_000


def _bodies(w) -> list[bytes]:
    amount, cat, cart = w.props["amount"], w.props["category"], w.props["cart_id"]
    docs = []
    for i, (u, e, t) in enumerate(zip(w.user.tolist(), w.event.tolist(), w.ts.tolist())):
        p = {}
        if amount[i] == amount[i]:
            p["amount"] = float(amount[i])
        if cat[i] is not None:
            p["category"] = cat[i]
        if cart[i] is not None:
            p["cart_id"] = cart[i]
        docs.append({"user": u, "event": e, "ts": t, "props": p})
    return [msgspec.json.encode(docs[i:i + BATCH]) for i in range(0, len(docs), BATCH)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, tmp_path, w, mode: str):
        rules = tmp_path / "rules.txt"
        rules.write_text("".join(f"{k}: {v}\n" for k, v in DEFAULT_SEGMENTS.items()))
        args = ["--rules", str(rules)]
        if mode != "memory":
            data = tmp_path / f"data-{mode}"
            # the workload's traits go in through the data dir (recovered at start)
            eng = segcore.Engine(wal=str(data), fsync="never")
            eng.add_segments(DEFAULT_SEGMENTS)
            eng.set_traits_many(user=w.trait_user, **w.traits)
            eng.checkpoint()
            eng.close()
            args += ["--data-dir", str(data),
                     "--fsync", "never" if mode == "log" else "always"]
        self.port = _free_port()
        self.log = open(tmp_path / f"server-{mode}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "segcore", "serve", "--port", str(self.port),
             "--log-level", "warning", *args], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, (tmp_path / f"server-{mode}.log").read_text()
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=120)
        self.log.close()


@pytest.mark.parametrize("clients", [1, 2])
@pytest.mark.parametrize("mode", ["memory", "log", "log+fsync"])
def test_http_events(benchmark, workload, tmp_path, mode, clients):
    """Every batch of the workload (at most 200k events) through POST /v1/events, from
    ``clients`` connections at once (batch ``i`` on connection ``i % clients``; with one,
    each request waits for the previous response)."""
    w = workload[: min(len(workload), MAX_EVENTS)]
    bodies = _bodies(w)
    # in process, same bodies, same engine set-up: the baseline of the ratio
    eng = new_engine(w)
    t0 = time.perf_counter()
    for body in bodies:
        eng.track_json(body)
    in_process = time.perf_counter() - t0

    server = _Server(tmp_path, w, mode)
    lat = np.zeros(len(bodies))
    try:
        conns = [httpx.Client(base_url=server.url, timeout=60) for _ in range(clients)]

        def send(k: int) -> None:
            for i in range(k, len(bodies), clients):
                t = time.perf_counter()
                r = conns[k].post("/v1/events", content=bodies[i],
                                  headers={"Content-Type": "application/json"})
                lat[i] = time.perf_counter() - t
                assert r.status_code == 200, r.text

        def run():
            threads = [threading.Thread(target=send, args=(k,)) for k in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        t0 = time.perf_counter()
        benchmark.pedantic(run, rounds=1)
        total = time.perf_counter() - t0
        metrics = conns[0].get("/metrics").text
        for c in conns:
            c.close()
    finally:
        server.stop()
    assert f"segcore_events_accepted_total {float(len(w))}" in metrics
    engine_s = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("segcore_ingest_seconds_sum "))
    record(benchmark, events=len(w), batch=BATCH, events_per_s=len(w) / total,
           p50_ms=float(np.percentile(lat, 50)) * 1e3,
           p99_ms=float(np.percentile(lat, 99)) * 1e3,
           in_process_events_per_s=len(w) / in_process,
           server_engine_share=engine_s / total,
           http_over_in_process=total / in_process)
