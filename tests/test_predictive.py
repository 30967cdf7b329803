"""Built-in predictive scores (docs/predictive.md): churn, p_alive, expected purchases,
lifetime value and convert, kept live and time-exact.

Every behaviour test runs on the compiled engine and on the reference engine (``make_engine``).
Expected values and crossing instants come from :mod:`segcore.predict`'s vectorised numpy
formulas (and closed forms), independent of both engines' scalar code.
"""

import math

import numpy as np
import pytest

import segcore
from segcore import EventError, RuleError, SegcoreError
from segcore import predict as P

H, D = 3_600_000, 86_400_000
T0 = 1000 * D                   # a UTC midnight
#: CDNOW's published BG/NBD estimates, in days instead of weeks (alpha * 7)
BG = P.BGNBD(r=0.243, alpha=4.414 * 7, a=0.793, b=2.426)
GG = P.GammaGamma(p=6.25, q=3.74, v=15.44)
#: convert: intercept, log1p(views), log1p(carts), log1p(clicks), active days / 7, recency / 7
LR = P.Logistic(coef=(-1.1, 0.8, 1.5, 0.5, 1.0, -8.0))
MODEL = P.PredictiveModel(bgnbd=BG, gamma_gamma=GG, convert=LR)


def _enc(model):
    """A model's JSON (NaN log-likelihoods of unfitted models compare equal as null)."""
    import msgspec
    return msgspec.json.encode(model)


def _tr(out):
    return [(t.user, t.segment, t.entered, t.ts) for t in out]


def _eng(make_engine, **kw):
    eng = make_engine(predictive=True, **kw)
    eng.set_predictive_model(MODEL)
    return eng


def _buy(eng, user, ts, amount=None):
    return eng.track(user, "purchase", ts=ts, props={} if amount is None else {"amount": amount})


def _churn(x, t_x_ms, T_ms):
    return 1 - float(P.p_alive(BG, x, t_x_ms / D, T_ms / D))


def _crossing_churn(first, last, x, theta):
    """The first ms at which churn >= theta, from the closed form of p_alive, then checked
    against the numpy formula on both sides."""
    a, b, r, al = BG.a, BG.b, BG.r, BG.alpha
    t_x = (last - first) / D
    T = (al + t_x) * (((1 / (1 - theta)) - 1) * (b + x - 1) / a) ** (1 / (r + x)) - al
    X = first + math.ceil(T * D)
    while _churn(x, last - first, X - 1 - first) >= theta:
        X -= 1
    while _churn(x, last - first, X - first) < theta:
        X += 1
    return X


# ---------------------------------------------------------------- churn and p_alive
def test_churn_crosses_its_threshold_exactly_on_time_with_no_event(make_engine):
    eng = _eng(make_engine)
    eng.add_segment("at_risk", "score.churn >= 0.7")
    for ts in (T0, T0 + 3 * D, T0 + 10 * D):
        assert _tr(_buy(eng, 1, ts)) == []
    X = _crossing_churn(T0, T0 + 10 * D, 2, 0.7)
    assert X > T0 + 30 * D
    assert _tr(eng.advance(X - 1)) == []
    assert eng.segments_of(1) == []
    assert _tr(eng.advance(X + 5 * D)) == [(1, "at_risk", True, X)]
    # a new purchase brings the user back at once, and the next crossing is later
    assert _tr(_buy(eng, 1, X + 5 * D)) == [(1, "at_risk", False, X + 5 * D)]
    X2 = _crossing_churn(T0, X + 5 * D, 3, 0.7)
    assert _tr(eng.advance(X2 - 1)) == []
    assert _tr(eng.advance(X2)) == [(1, "at_risk", True, X2)]


def test_churn_and_p_alive_values_match_the_model(make_engine):
    eng = _eng(make_engine)
    eng.add_segment("x", "seen")
    _buy(eng, 7, T0)
    _buy(eng, 7, T0 + 2 * D)
    eng.advance(T0 + 20 * D)
    sc = eng.scores_of(7)
    want = float(P.p_alive(BG, 1, 2.0, 20.0))
    assert sc["p_alive"] == pytest.approx(want, rel=1e-12)
    assert sc["churn"] == pytest.approx(1 - want, rel=1e-12)
    assert sc["expected_purchases_90d"] == pytest.approx(
        float(P.expected_purchases(BG, 90.0, 1, 2.0, 20.0)), rel=1e-9)


def test_one_time_buyer_is_alive_under_bgnbd_and_a_non_buyer_has_no_churn(make_engine):
    eng = _eng(make_engine)
    eng.add_segments({"risk": "score.churn >= 0.1", "has": "score.churn exists"})
    _buy(eng, 1, T0)
    eng.track(2, "page_view", ts=T0)
    eng.advance(T0 + 3000 * D)
    assert eng.segments_of(1) == ["has"]          # BG/NBD: no repeat purchase, P(alive) = 1
    assert eng.scores_of(1)["p_alive"] == 1.0
    assert eng.segments_of(2) == []
    assert "churn" not in eng.scores_of(2)


def test_a_late_purchase_moves_the_crossing(make_engine):
    eng = _eng(make_engine)
    eng.add_segment("at_risk", "score.churn >= 0.7")
    _buy(eng, 1, T0)
    _buy(eng, 1, T0 + 10 * D)
    X = _crossing_churn(T0, T0 + 10 * D, 1, 0.7)
    eng.advance(T0 + 11 * D)
    # a late purchase between the two: x = 2, the same first and last purchase
    assert _tr(_buy(eng, 1, T0 + 5 * D)) == []
    X2 = _crossing_churn(T0, T0 + 10 * D, 2, 0.7)
    assert X2 > T0 + 11 * D and X2 != X
    out = _tr(eng.advance(max(X, X2) + D))
    assert out == [(1, "at_risk", True, X2)]
    # and one before the first purchase moves t_x and T
    eng2 = _eng(make_engine)
    eng2.add_segment("at_risk", "score.churn >= 0.7")
    for t in (T0, T0 + 10 * D, T0 + 5 * D):
        _buy(eng2, 1, t)
    _buy(eng2, 1, T0 - D)
    X3 = _crossing_churn(T0 - D, T0 + 10 * D, 3, 0.7)
    assert _tr(eng2.advance(X3 + D)) == [(1, "at_risk", True, X3)]


@pytest.mark.parametrize("op,k", [("<=", 0.3), ("<", 0.3), (">", 0.3), ("==", 0.3),
                                  ("!=", 0.3)])
def test_every_comparison_flips_on_the_right_millisecond(make_engine, op, k):
    eng = _eng(make_engine)
    eng.add_segment("s", f"score.p_alive {op} {k}")
    _buy(eng, 1, T0)
    _buy(eng, 1, T0 + 4 * D)
    X = _crossing_churn(T0, T0 + 4 * D, 1, 1 - k)       # p_alive <= k from X on
    now = T0 + 4 * D
    seen = []
    for t in (X - 1, X, X + 1, X + 100 * D):
        seen += _tr(eng.advance(t))
        now = t
        pa = float(P.p_alive(BG, 1, 4.0, (t - T0) / D))
        want = {"<=": pa <= k, "<": pa < k, ">": pa > k, "==": pa == k, "!=": pa != k}[op]
        assert (eng.segments_of(1) == ["s"]) == want, t
    assert now == X + 100 * D
    assert all(ts in (T0 + 4 * D, X) for *_, ts in seen)


def test_expected_purchases_and_ltv_cross_on_time(make_engine):
    eng = _eng(make_engine)
    eng.add_segments({"keen": "score.expected_purchases_90d >= 2",
                      "valuable": "score.ltv_90d > 60"})
    ts = [T0 + i * 2 * D for i in range(6)]
    for i, t in enumerate(ts):
        _buy(eng, 1, t, amount=10 + i)
    assert sorted(eng.segments_of(1)) == ["keen", "valuable"]
    first, last, x = ts[0], ts[-1], 5

    def ep(t):
        return float(P.expected_purchases(BG, 90.0, x, (last - first) / D, (t - first) / D))

    m = (11 + 12 + 13 + 14 + 15) / 5                      # repeat purchases only
    spend = float(P.expected_spend(GG, 5, m))

    def crossing(f, k):
        lo, hi = last, last + 10_000 * D
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if f(mid) >= k else (lo, mid)
        return hi

    X1 = crossing(ep, 2)
    X2 = crossing(lambda t: ep(t) * spend, 60 + 1e-12)
    got = _tr(eng.advance(max(X1, X2) + D))
    assert sorted(got, key=lambda r: r[3]) == sorted(
        [(1, "keen", False, X1), (1, "valuable", False, X2)], key=lambda r: r[3])
    assert eng.scores_of(1)["ltv_90d"] == pytest.approx(
        ep(max(X1, X2) + D) * spend, rel=1e-9)


def test_ltv_of_a_buyer_without_repeat_amounts_uses_the_population_mean(make_engine):
    eng = _eng(make_engine)
    eng.add_segment("x", "seen")
    _buy(eng, 1, T0, amount=500)
    _buy(eng, 1, T0 + D)                          # no amount
    eng.advance(T0 + 2 * D)
    e = float(P.expected_purchases(BG, 90.0, 1, 1.0, 2.0))
    assert eng.scores_of(1)["ltv_90d"] == pytest.approx(e * GG.p * GG.v / (GG.q - 1),
                                                        rel=1e-9)


# ---------------------------------------------------------------- convert
def _convert(views, carts, clicks, active, recency):
    z = LR.coef[0] + np.dot(LR.coef[1:], [math.log1p(views), math.log1p(carts),
                                          math.log1p(clicks), active / 7, recency / 7])
    return 1 / (1 + math.exp(-z))


def test_convert_moves_at_utc_midnights_and_leaves_when_the_user_buys(make_engine):
    eng = _eng(make_engine)
    eng.add_segment("likely", "score.convert >= 0.5")
    eng.track(1, "product_view", ts=T0 + H)
    eng.track(1, "product_view", ts=T0 + 2 * H)
    assert eng.scores_of(1)["convert"] == pytest.approx(_convert(2, 0, 0, 1, 0), rel=1e-12)
    assert _tr(eng.track(1, "add_to_cart", ts=T0 + 3 * H)) == [(1, "likely", True, T0 + 3 * H)]
    assert _convert(2, 1, 0, 1, 0) >= 0.5 > _convert(2, 1, 0, 1, 1)
    # recency grows at midnight: out at T0 + 1d exactly, by time alone
    assert _tr(eng.advance(T0 + D - 1)) == []
    assert _tr(eng.advance(T0 + 3 * D)) == [(1, "likely", False, T0 + D)]
    assert eng.scores_of(1)["convert"] == pytest.approx(_convert(2, 1, 0, 1, 3), rel=1e-12)
    # after 7 days with no event the score is missing
    eng.advance(T0 + 7 * D)
    assert "convert" not in eng.scores_of(1)
    eng.track(1, "add_to_cart", ts=T0 + 7 * D + H)
    eng.track(1, "add_to_cart", ts=T0 + 7 * D + 2 * H)
    assert eng.segments_of(1) == ["likely"]
    assert _tr(_buy(eng, 1, T0 + 7 * D + 3 * H)) == [(1, "likely", False, T0 + 7 * D + 3 * H)]
    assert "convert" not in eng.scores_of(1)


def test_convert_reenters_at_midnight_when_a_negative_factor_leaves_the_window(make_engine):
    eng = make_engine(predictive=True)
    # many email clicks count against conversion in this model
    eng.set_predictive_model(P.PredictiveModel(
        convert=P.Logistic(coef=(0.0, 1.0, 0.0, -2.0, 0.0, 0.0))))
    eng.add_segment("likely", "score.convert > 0.5")
    eng.track(1, "product_view", ts=T0 + 5 * D)
    eng.track_many(user=[1] * 3, event=["email_click"] * 3, ts=[T0 + H, T0 + 2 * H, T0 + 3 * H])
    assert eng.segments_of(1) == []
    # the clicks of day T0 leave the 7-day window at T0 + 7d; the view stays
    assert _tr(eng.advance(T0 + 9 * D)) == [(1, "likely", True, T0 + 7 * D)]


# ---------------------------------------------------------------- overrides, errors, options
def test_a_callers_score_overrides_the_builtin_and_none_gives_it_back(make_engine):
    eng = _eng(make_engine)
    eng.add_segments({"risk": "score.churn >= 0.7", "vip": "score.tier >= 2",
                      "both": "score.churn >= 0.7 and score.tier >= 2"})
    _buy(eng, 1, T0)
    _buy(eng, 1, T0 + D)
    assert sorted(_tr(eng.set_scores(1, {"churn": 0.9, "tier": 3}))) == [
        (1, "both", True, T0 + D), (1, "risk", True, T0 + D), (1, "vip", True, T0 + D)]
    eng.advance(T0 + 10_000 * D)                 # the override holds whatever the model says
    assert eng.scores_of(1)["churn"] == 0.9
    out = _tr(eng.set_scores(1, {"churn": 0.0}))
    assert sorted(out) == [(1, "both", False, T0 + 10_000 * D),
                           (1, "risk", False, T0 + 10_000 * D)]
    # back to the model, which says the user churned long ago
    assert sorted(_tr(eng.set_scores(1, {"churn": None}))) == [
        (1, "both", True, T0 + 10_000 * D), (1, "risk", True, T0 + 10_000 * D)]


def test_without_predictive_churn_is_an_ordinary_caller_score(make_engine):
    eng = make_engine()
    eng.add_segment("risk", "score.churn >= 0.7 and score.churn + 0.1 < 1")
    eng.track(1, "purchase", ts=T0)
    assert eng.segments_of(1) == []
    eng.set_scores(1, {"churn": 0.8})
    assert eng.segments_of(1) == ["risk"]
    with pytest.raises(SegcoreError, match=r"fit_predictive\(\) needs the predictive "
                                           r"statistics: create the engine with "
                                           r"Engine\(predictive=True\)"):
        eng.fit_predictive()


@pytest.mark.parametrize("rule", ["score.churn + 0.1 >= 0.8", "score.churn >= score.tier",
                                  "score.ltv_90d > sum(purchase.amount)",
                                  "score.convert between 0.2 and score.x"])
def test_a_builtin_score_can_only_be_compared_with_a_number(make_engine, rule):
    eng = _eng(make_engine)
    eng.add_segment("ok", "score.churn between 0.2 and 0.5 or score.convert in [0.5, 1]")
    with pytest.raises(RuleError, match=r"is a built-in predictive score: it can only be "
                                        r"compared with a number"):
        eng.add_segment("bad", rule)
    assert list(eng.segments) == ["ok"]


def test_horizon_option_names_the_scores(make_engine):
    eng = make_engine(predictive={"horizon": "30d", "purchase": "order", "amount": "total",
                                  "convert_events": ["view"]})
    eng.set_predictive_model(P.PredictiveModel(bgnbd=BG, gamma_gamma=GG,
                                               convert=P.Logistic(coef=(0, 1, 0, 0))))
    eng.add_segment("k", "score.expected_purchases_30d > 0.1 and score.ltv_30d > 1")
    eng.track(1, "order", ts=T0, props={"total": 5})
    eng.track(1, "order", ts=T0 + D, props={"total": 7})
    assert eng.segments_of(1) == ["k"]
    assert eng.scores_of(1)["expected_purchases_30d"] == pytest.approx(
        float(P.expected_purchases(BG, 30.0, 1, 1.0, 1.0)), rel=1e-9)
    # expected_purchases_90d is not built in on this engine: an ordinary (missing) score
    eng.add_segment("other", "score.expected_purchases_90d + 1 > 0")
    assert eng.segments_of(1) == ["k"]


@pytest.mark.parametrize("opt,msg", [
    ("yes", "predictive must be True, None or a dict of options"),
    ({"purchases": "x"}, "unknown predictive option"),
    ({"purchase": ""}, "predictive purchase must be a non-empty string"),
    ({"convert_events": ["purchase"]}, "at most 8 distinct event types other than `purchase`"),
    ({"convert_events": "view"}, "must be a list of event type names"),
    ({"horizon": "0d"}, "horizon must be longer than 0"),
    ({"horizon": "soon"}, "predictive horizon"),
])
def test_bad_predictive_options(make_engine, opt, msg):
    with pytest.raises(SegcoreError, match=msg):
        make_engine(predictive=opt)


@pytest.mark.parametrize("model,msg", [
    ({"bgnbd": {"r": -1, "alpha": 1, "a": 1, "b": 1}}, r"bgnbd.r must be a finite number > 0"),
    ({"gamma_gamma": {"p": 1, "q": 0.5, "v": 1}}, r"gamma_gamma.q must be > 1"),
    ({"convert": {"coef": [1, 2]}}, r"convert.coef must be 6 finite numbers"),
    ({"bgnbd": 3}, r"not a predictive model"),
])
def test_bad_model_is_rejected_and_changes_nothing(make_engine, model, msg):
    eng = _eng(make_engine)
    eng.add_segment("risk", "score.churn >= 0.5")
    _buy(eng, 1, T0)
    _buy(eng, 1, T0 + D)
    before = (eng.scores_of(1), _enc(eng.predictive_model))
    with pytest.raises(SegcoreError, match=msg):
        eng.set_predictive_model(model)
    assert (eng.scores_of(1), _enc(eng.predictive_model)) == before


def test_a_purchase_amount_must_be_a_number_and_the_batch_is_rejected_whole(make_engine):
    eng = _eng(make_engine)
    eng.add_segment("x", "score.ltv_90d > 0")
    _buy(eng, 1, T0, amount=3)
    with pytest.raises(EventError, match=r"must be a number") as e:
        eng.track_many(user=[1, 1], event=["purchase", "purchase"], ts=[T0 + 1, T0 + 2],
                       props={"amount": np.array([4, "x"], dtype=object)})
    assert (e.value.index, e.value.field) == (1, "props.amount")
    assert eng.scores_of(1).get("ltv_90d") == pytest.approx(
        float(P.expected_purchases(BG, 90.0, 0, 0.0, 0.0)) * GG.p * GG.v / (GG.q - 1))


# ---------------------------------------------------------------- profiles
def test_alias_merges_purchase_histories_and_forget_erases_them(make_engine):
    eng = _eng(make_engine)
    eng.add_segment("risk", "score.churn >= 0.7")
    _buy(eng, "a", T0 + 4 * D)
    _buy(eng, "b", T0)
    _buy(eng, "b", T0 + 2 * D)
    eng.alias("a", "b")
    eng.advance(T0 + 5 * D)
    assert eng.scores_of("a")["p_alive"] == pytest.approx(
        float(P.p_alive(BG, 2, 4.0, 5.0)), rel=1e-12)
    X = _crossing_churn(T0, T0 + 4 * D, 2, 0.7)
    assert _tr(eng.advance(X)) == [("a", "risk", True, X)]
    eng.forget("a")
    assert eng.scores_of("a") == {}
    eng.track("a", "page_view", ts=X + 1)
    assert "churn" not in eng.scores_of("a")


def test_predictive_scores_columns(make_engine):
    eng = _eng(make_engine)
    eng.add_segment("x", "seen")
    _buy(eng, 5, T0)
    eng.track(6, "product_view", ts=T0)
    cols = eng.predictive_scores()
    assert sorted(cols) == ["churn", "convert", "expected_purchases_90d", "ltv_90d", "p_alive",
                            "user"]
    assert cols["user"].tolist() == [5, 6]
    assert cols["p_alive"][0] == 1.0 and math.isnan(cols["p_alive"][1])
    assert math.isnan(cols["convert"][0]) and 0 < cols["convert"][1] < 1


def test_amount_is_checked_even_before_any_segment(make_engine):
    eng = make_engine(predictive=True)
    with pytest.raises(EventError, match="must be a number") as e:
        eng.track(1, "purchase", ts=T0, props={"amount": "12"})
    assert e.value.field == "props.amount"
    assert eng.stats()["events"] == 0
    # not on an engine without predictive statistics
    make_engine().track(1, "purchase", ts=T0, props={"amount": "12"})


# ---------------------------------------------------------------- durability (compiled engine)
def _busy(eng):
    eng.add_segments({"risk": "score.churn >= 0.7", "likely": "score.convert >= 0.5"})
    for u in range(6):
        for k in range(u % 3 + 1):
            _buy(eng, u, T0 + k * 3 * D + u * H, amount=5 + u)
        eng.track(100 + u, "add_to_cart", ts=T0 + 20 * D + u * H)
        eng.track(100 + u, "product_view", ts=T0 + 20 * D + u * H + 1)
    eng.advance(T0 + 20 * D + 10 * H)


def test_snapshot_keeps_statistics_options_and_model(tmp_path):
    eng = segcore.Engine(predictive={"horizon": "30d"})
    eng.set_predictive_model(MODEL)
    _busy(eng)
    eng.snapshot(tmp_path / "s.snap")
    back = segcore.Engine.restore(tmp_path / "s.snap")
    assert _enc(back.predictive_model) == _enc(eng.predictive_model)
    for u in (0, 1, 2, 3, 100, 105):
        assert back.scores_of(u) == eng.scores_of(u)
    later = T0 + 400 * D
    assert _tr(back.advance(later)) == _tr(eng.advance(later))
    assert back.members("risk") == eng.members("risk") and len(eng.members("risk")) >= 2


def test_reopened_log_replays_the_model_and_its_crossings(tmp_path):
    eng = segcore.Engine(predictive=True, wal=tmp_path / "d")
    _busy(eng)
    eng.set_predictive_model(MODEL)
    expect = _tr(eng.advance(T0 + 400 * D))
    assert expect
    back = segcore.Engine.open(tmp_path / "d")
    assert _enc(back.predictive_model) == _enc(MODEL)
    back2 = segcore.Engine.open(tmp_path / "d")      # replays again, identically
    assert back.members("risk") == eng.members("risk") == back2.members("risk")


def test_snapshot_with_a_bad_model_or_options_raises(tmp_path):
    import msgspec
    from segcore import snapshot
    eng = segcore.Engine(predictive=True)
    eng.set_predictive_model(MODEL)
    _busy(eng)
    meta, arrays = snapshot.state(eng)
    assert _enc(snapshot._rebuild(meta, arrays, None, None).predictive_model) == _enc(MODEL)
    for bad in ({"bgnbd": {"r": float("inf"), "alpha": 1, "a": 1, "b": 1}},
                {"convert": {"coef": [1]}}):
        m = msgspec.structs.replace(meta, pred_model=bad)
        with pytest.raises(segcore.SnapshotError, match="cannot restore snapshot: bad engine "
                                                       "options"):
            snapshot._rebuild(m, arrays, None, None)
    m = msgspec.structs.replace(meta, predictive={"convert_events": ["purchase"]})
    with pytest.raises(segcore.SnapshotError, match="bad engine options"):
        snapshot._rebuild(m, arrays, None, None)


# ---------------------------------------------------------------- fitting
def test_fit_with_too_little_data_skips_each_model_and_says_why(make_engine):
    eng = make_engine(predictive=True)
    eng.add_segment("risk", "score.churn >= 0.5")
    _buy(eng, 1, T0, amount=4)
    assert list(eng.fit_predictive()) == []
    m = eng.predictive_model
    assert (m.bgnbd, m.gamma_gamma, m.convert, m.fitted_at) == (None, None, None, T0)
    assert m.skipped == {
        "bgnbd": "needs at least 2 buyers and a repeat purchase; have 1 buyers, 0 with a repeat",
        "gamma_gamma": "needs at least 2 buyers with a repeat purchase carrying an amount > 0; "
                       "have 0",
        "convert": "needs both outcomes among the 0 users active 8-14 days ago who had not "
                   "bought; 0 converted"}
    with pytest.raises(SegcoreError, match="l2 must be a number >= 0"):
        eng.fit_predictive(l2=-1)


def test_fit_on_a_synthetic_shop_gives_the_same_model_on_both_engines():
    from segcore.synth import generate
    import segcore_ref
    w = generate(n_users=300, n_events=6_000, days=40, seed=3)
    engines = [segcore.Engine(predictive=True), segcore_ref.RefEngine(predictive=True)]
    for eng in engines:
        eng.add_segment("risk", "score.churn >= 0.6")
        eng.track_many(user=w.user, event=w.event, ts=w.ts, props={"amount": w.props["amount"]})
        eng.fit_predictive()
    a, b = (e.predictive_model for e in engines)
    assert a.skipped == b.skipped == {}
    for x, y in ((a.bgnbd, b.bgnbd), (a.gamma_gamma, b.gamma_gamma)):
        for f in x.__struct_fields__:
            assert getattr(x, f) == pytest.approx(getattr(y, f), rel=1e-6)
    assert a.convert.coef == pytest.approx(b.convert.coef, rel=1e-6, abs=1e-9)
    assert engines[0].members("risk") == engines[1].members("risk")
    assert 0 < len(engines[0].members("risk")) < 300
