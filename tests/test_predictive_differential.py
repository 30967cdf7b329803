"""Randomised differential tests of the built-in predictive scores (docs/predictive.md): the
compiled engine (per-user statistics, a day ring, crossing instants found by bisection and
cached on the timers) against the reference engine (every score recomputed from the kept
events at every candidate instant).

Models are chosen so that scores cross their thresholds within days; time moves in hours
plus or minus 1 ms (events often late, across UTC midnights), by ``advance`` alone too, and
the model changes mid-stream.
"""

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segcore
import segcore_ref
from segcore import predict as P
from test_differential import _check_same, _run
from test_differential import events as differential_events

H, D = 3_600_000, 86_400_000
START = 500 * D + 20 * H        # four hours before a UTC midnight

MODELS = [
    P.PredictiveModel(bgnbd=P.BGNBD(r=0.5, alpha=2.0, a=0.8, b=2.5),
                      gamma_gamma=P.GammaGamma(p=6.0, q=3.7, v=15.0),
                      convert=P.Logistic(coef=(-1.0, 0.9, 1.2, -0.7, 1.5, -4.0))),
    P.PredictiveModel(bgnbd=P.BGNBD(r=2.0, alpha=0.5, a=1.5, b=0.7),
                      convert=P.Logistic(coef=(0.5, -0.3, 0.4, 2.0, -1.0, 3.0))),
    P.PredictiveModel(),
]

RULES = {
    "risk": "score.churn >= 0.5",
    "alive": "score.p_alive < 0.3",
    "band": "score.churn between 0.2 and 0.6",
    "eq": "score.p_alive == 1",
    "keen": "score.expected_purchases_90d >= 3",
    "low": "score.expected_purchases_90d < 0.5 and score.expected_purchases_90d exists",
    "ltv": "score.ltv_90d > 100",
    "conv": "score.convert >= 0.4",
    "conv_in": "score.convert in [0.5] or score.convert <= 0.2",
    "conv_ex": "score.convert exists and not in(conv)",
    "mixed": "count(purchase, 7d) >= 1 and score.churn > 0.4",
    "caller": "score.churn >= 0.5 and score.tier >= 1",
}

USERS = [0, 1, 2, "ann"]
HOT_USERS = [0, 0, 1, "ann"] + USERS
EVENTS = ["purchase", "purchase", "product_view", "product_view", "add_to_cart",
          "email_click", "page_view"]
PROPS = {"purchase": {"amount": [1, 2.5, 10, 40, None]}}

DT = st.builds(lambda h, ms: h * H + ms, st.one_of(st.integers(-40, 3), st.integers(0, 3)),
               st.sampled_from([0, 0, 1, -1]))


def events():
    return differential_events(EVENTS, PROPS, HOT_USERS, DT)


ops = st.one_of(
    st.tuples(st.just("track"), events()),
    st.tuples(st.just("track"), events()),
    st.tuples(st.just("batch"), st.lists(events(), min_size=1, max_size=8)),
    st.tuples(st.just("advance"), st.integers(0, 4).map(lambda k: k * D) |
              st.integers(0, 30).map(lambda k: k * H) | st.integers(0, 3 * D)),
    st.tuples(st.just("scores"), st.sampled_from(HOT_USERS),
              st.fixed_dictionaries({}, optional={
                  "churn": st.sampled_from([0.1, 0.9, None]),
                  "tier": st.sampled_from([0, 2, None])})),
    st.tuples(st.just("model"), st.integers(0, len(MODELS) - 1)),
    st.tuples(st.just("alias"), st.sampled_from(HOT_USERS), st.sampled_from(USERS + ["cy"])),
    st.tuples(st.just("forget"), st.sampled_from(USERS)),
)

#: deeper local runs: SEGCORE_PREDICT_EXAMPLES=3000 python -m pytest tests/test_predictive_differential.py
EXAMPLES = int(os.environ.get("SEGCORE_PREDICT_EXAMPLES", "200"))


def _same_scores(a, b, what):
    sa, sb = a.predictive_scores(), b.predictive_scores()
    order = np.argsort(sa["user"])
    assert sorted(sa["user"].tolist()) == sorted(sb["user"].tolist()), what
    ob = np.argsort(sb["user"])
    for name in sa:
        if name != "user":
            np.testing.assert_allclose(sa[name][order], sb[name][ob], rtol=1e-12,
                                       err_msg=f"{name} after {what}")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(RULES)), min_size=1, max_size=6, unique=True),
       st.lists(ops, min_size=1, max_size=30), st.integers(0, len(MODELS) - 1))
def test_predictive_segments_match_reference(names, script, model):
    need = set(names) | ({"conv"} if "conv_ex" in names else set())
    rules = {n: r for n, r in RULES.items() if n in need}
    a = segcore.Engine(predictive=True)
    b = segcore_ref.RefEngine(predictive=True)
    _check_same(a, b, a.set_predictive_model(MODELS[model]),
                b.set_predictive_model(MODELS[model]), "model")
    _check_same(a, b, a.add_segments(rules), b.add_segments(rules), "add_segments")
    _check_same(a, b, a.advance(START), b.advance(START), "start")
    state = {"now": START}
    for i, op in enumerate(script):
        if op[0] == "model":
            ta = a.set_predictive_model(MODELS[op[1]])
            tb = b.set_predictive_model(MODELS[op[1]])
        else:
            ta, tb = _run((a, b), op, state)
        _check_same(a, b, ta, tb, f"step {i}: {op}")
        state["now"] = a.now
    _same_scores(a, b, "the script")
    # time alone: scores decay, convert windows slide, crossings far away
    for k in (H, D, 3 * D, 8 * D, 60 * D, 4000 * D):
        t = state["now"] + k
        _check_same(a, b, a.advance(t), b.advance(t), f"advance to now + {k}")
    _same_scores(a, b, "the advances")


@settings(max_examples=max(20, EXAMPLES // 5), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=40))
def test_training_data_matches_reference(script):
    """What fit_predictive fits on, from the kernel's statistics and ring, equals the naive
    computation from every event (then both engines fit the same model)."""
    a = segcore.Engine(predictive=True)
    b = segcore_ref.RefEngine(predictive=True)
    state = {"now": START}
    a.advance(START), b.advance(START)
    for op in script:
        if op[0] == "model":
            continue
        if op[0] == "advance":
            op = ("advance", op[1] * 3)
        _run((a, b), op, state)
        state["now"] = a.now
    da = P.training_data(a._kernel, a._pred, a.now)
    db = b.predictive_training_data()
    for k in da:
        np.testing.assert_allclose(da[k], db[k], rtol=1e-12, err_msg=k)
