"""Built-in predictive scores (docs/predictive.md) on the synthetic shop: ingestion with the
default segments, then with the predictive statistics kept, then with three predictive
segments live (crossing instants on the timers); against the reference engine in the same
run; and the cost of ``fit_predictive``."""

import pytest

import segcore
from segcore import predict as P
from workloads import REF_EVENTS, new_engine, on_fresh_engines, pass_rounds, record, vs_reference

#: CDNOW's published estimates with alpha in days; a plausible convert model
MODEL = P.PredictiveModel(
    bgnbd=P.BGNBD(r=0.243, alpha=4.414 * 7, a=0.793, b=2.426),
    gamma_gamma=P.GammaGamma(p=6.25, q=3.74, v=15.44),
    convert=P.Logistic(coef=(-4.0, 0.5, 1.0, 0.3, 1.0, -1.0)))
PREDICTIVE_SEGMENTS = {
    "churn_risk": "score.churn >= 0.7 and in(high_ltv)",
    "likely_buyers": "score.convert >= 0.3",
    "valuable": "score.ltv_90d >= 200",
}


def predictive_engine(w, engine_cls=segcore.Engine, only_active=False, mode="segments"):
    if mode == "off":
        return new_engine(w, engine_cls, only_active)
    eng = new_engine(w, engine_cls, only_active, predictive=True)
    if mode == "segments":
        eng.set_predictive_model(MODEL)
        eng.add_segments(PREDICTIVE_SEGMENTS)
    return eng


def stream(eng, w, batch):
    n = 0
    for b in w.batches(batch):
        n += len(eng.track_many(user=b.user, event=b.event, ts=b.ts,
                                props={k: b.props[k] for k in ("amount", "category")}))
    return n


@pytest.mark.parametrize("mode", ["off", "stats", "segments"])
def test_track_many_predictive(benchmark, workload, mode):
    """A whole pass in batches of 10k: default segments; + predictive statistics; + the three
    predictive segments with a model."""
    eng = on_fresh_engines(benchmark, lambda: predictive_engine(workload, mode=mode),
                           lambda eng: stream(eng, workload, 10_000), pass_rounds(workload))
    if benchmark.stats:
        record(benchmark, events=len(workload),
               events_per_s=len(workload) / benchmark.stats.stats.median,
               memory_bytes=eng.stats()["memory_bytes"])


def test_predictive_vs_reference(benchmark, workload):
    """The same slice with the predictive segments through the kernel and the reference."""
    vs_reference(benchmark, workload[:REF_EVENTS],
                 lambda part, cls: predictive_engine(part, cls, only_active=True),
                 lambda eng, part: stream(eng, part, 1_000))


def test_fit_predictive(benchmark, workload):
    """fit_predictive on the state after the whole workload (all three models)."""
    eng = predictive_engine(workload, mode="segments")
    stream(eng, workload, 100_000)
    benchmark.pedantic(eng.fit_predictive, rounds=1)
    m = eng.predictive_model
    assert m.skipped == {}, m.skipped
    if benchmark.stats:
        record(benchmark, buyers=m.bgnbd.n, seconds=benchmark.stats.stats.median)
