"""Out-of-time validation of the built-in predictive scores on synthetic shops.

Each workload (:func:`segcore.synth.generate`, 150 days) is fed into
``Engine(predictive=...)`` up to day 120, the models are fitted there and every user is scored;
the scores are then compared with the last 30 days (the events after the cutoff, and the
generator's own lifetimes, ``Workload.active_until``). The synthetic shop is not a BG/NBD
world (exponential lifetimes, Zipf activity spread uniformly over them), so these are quality
bounds, not exact values: each was measured over 200+ seeds (3000 users) or 100 seeds (20000
users) and is set with a margin below the worst seed seen. bench/predictive_validation.py
reports the same numbers at any size.

Known limitation, deliberately not asserted: over *all* buyers, ``churn`` ranks "no event in
the next 30 days" no better than chance (AUC about 0.49), because BG/NBD gives the one-time
buyers (about 70 % of buyers) ``p_alive = 1`` while they are the likeliest to have lapsed; the
plain "days since the last event" heuristic reaches about 0.88. The assertions on ranking are
therefore made among repeat buyers, where BG/NBD's recency/frequency trade-off applies.
"""

from __future__ import annotations

import numpy as np
import pytest

import segcore
from segcore.synth import EVENT_TYPES, generate

DAY = 86_400_000
PURCHASE = EVENT_TYPES.index("purchase")
DAYS, CUTOFF_DAYS = 150, 120


def _auc(score, label) -> float:
    """Mann-Whitney AUC, P(score of a positive > score of a negative), ties 1/2."""
    score = np.asarray(score, dtype=float)
    label = np.asarray(label, dtype=bool)
    n1 = int(label.sum())
    n0 = label.size - n1
    assert n1 and n0, "AUC needs both classes"
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    new = np.ones(s.size, dtype=bool)
    new[1:] = s[1:] != s[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], s.size)
    ranks = np.empty(s.size)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new) - 1]
    return float((ranks[label].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def test_auc_helper():
    assert _auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert _auc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    assert _auc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5
    assert _auc([1, 2, 2, 3], [0, 1, 0, 1]) == 0.875   # pairs: 1 win, 1 tie, 2 wins


def _validate(n_users: int, n_events: int, seed: int) -> dict:
    w = generate(n_users, n_events, days=DAYS, seed=seed)
    n = w.n_users
    cutoff = w.start_ms + CUTOFF_DAYS * DAY
    h = DAYS - CUTOFF_DAYS                    # the period left: the horizon of the scores
    eng = segcore.Engine(predictive={"horizon": f"{h}d"})
    for b in w.batches(50_000):
        m = b.ts < cutoff
        if m.any():
            eng.track_many(user=b.user[m], event=b.event[m], ts=b.ts[m],
                           props={"amount": b.num_props["amount"][m]})
    eng.advance(cutoff)
    eng.fit_predictive()
    sc = eng.predictive_scores()
    ids = sc["user"].astype(np.int64)

    def col(name):
        out = np.full(n, np.nan)
        out[ids] = sc[name]
        return out

    u = w.user.astype(np.int64)
    buy = w.event_code == PURCHASE
    pre, post = w.ts < cutoff, w.ts >= cutoff
    last_any = np.full(n, np.iinfo(np.int64).min)
    np.maximum.at(last_any, u[pre], w.ts[pre])
    day = cutoff // DAY                       # convert reads the UTC days day-6 .. day
    recent = pre & (w.ts >= (day - 6) * DAY)
    return {
        "model": eng.predictive_model, "cutoff": cutoff, "seen": np.isin(np.arange(n), ids),
        "churn": col("churn"), "p_alive": col("p_alive"),
        "expected": col(f"expected_purchases_{h}d"), "ltv": col(f"ltv_{h}d"),
        "convert": col("convert"),
        "n_buy": np.bincount(u[pre & buy], minlength=n),
        "active_7d": np.bincount(u[recent], minlength=n) > 0,
        "days_since_last": (cutoff - last_any) / DAY,
        "no_event_30d": np.bincount(u[post], minlength=n) == 0,      # post = the last 30 days
        "gone": w.active_until < cutoff,
        "buys_after": np.bincount(u[post & buy], minlength=n).astype(float),
        "converted_7d": np.bincount(u[post & buy & (w.ts < cutoff + 7 * DAY)], minlength=n) > 0,
    }


@pytest.fixture(scope="module", params=[0, 1, 2])
def small(request):
    return _validate(3_000, 60_000, request.param)


@pytest.fixture(scope="module")
def medium():
    return _validate(20_000, 400_000, 0)


def test_active_until():
    w = generate(3_000, 60_000, days=DAYS, seed=5)
    a = w.active_until
    assert a.dtype == np.int64 and a.shape == (w.n_users,)
    assert (a >= w.start_ms).all() and (a <= w.end_ms).all()
    assert 0.2 < (a == w.end_ms).mean() < 0.6       # alive at the end (lifetimes: mean 90 d)
    # no session after a user's end of activity (a purchase may close a cart a bit later)
    late = w.ts >= a[w.user]
    assert (w.event_code[late] == PURCHASE).all()
    assert (w.ts[late] < a[w.user[late]] + 12 * 3_600_000).all()
    b = w[100:200]
    assert b.active_until is a and next(iter(w.batches(1000))).active_until is a


def test_fit_is_not_skipped(small):
    m = small["model"]
    assert m.skipped == {}
    assert m.bgnbd is not None and m.gamma_gamma is not None and m.convert is not None
    assert m.fitted_at == small["cutoff"]
    assert m.bgnbd.n == int((small["n_buy"] >= 1).sum())
    assert m.gamma_gamma.q > 1


def test_score_populations(small):
    n_buy, churn, p_alive = small["n_buy"], small["churn"], small["p_alive"]
    buyers = n_buy >= 1
    assert np.array_equal(~np.isnan(churn), buyers)
    assert np.allclose(churn[buyers] + p_alive[buyers], 1.0)
    assert (p_alive[n_buy == 1] == 1.0).all()           # BG/NBD: no repeat, no drop-out
    repeat = n_buy >= 2
    assert ((p_alive[repeat] > 0) & (p_alive[repeat] < 1)).all()
    assert np.array_equal(~np.isnan(small["expected"]), buyers)
    assert (small["expected"][buyers] > 0).all() and (small["ltv"][buyers] > 0).all()
    conv = ~np.isnan(small["convert"])
    assert np.array_equal(conv, small["seen"] & ~buyers & small["active_7d"])
    assert ((small["convert"][conv] > 0) & (small["convert"][conv] < 1)).all()


def test_churn_ranks_lapsed_repeat_buyers(small):
    """Among repeat buyers, churn ranks "no event in the next 30 days" (measured AUC
    0.72-0.94 over 240 seeds) and the truly gone (0.61-0.90)."""
    rep = small["n_buy"] >= 2
    assert rep.sum() > 100
    label = small["no_event_30d"][rep]
    assert _auc(small["churn"][rep], label) > 0.65
    assert _auc(small["churn"][rep], small["gone"][rep]) > 0.55
    # the harness itself: the plain recency heuristic must rank these labels (0.88-0.97)
    assert _auc(small["days_since_last"][rep], label) > 0.8


def test_expected_purchases(small):
    """Overall predicted / actual purchases of the buyers in the 30 days: 0.62-2.14 over 240
    seeds at this size (a few heavy buyers dominate the sum); who buys again: AUC
    0.73-0.91."""
    buyers = small["n_buy"] >= 1
    pred, actual = small["expected"][buyers], small["buys_after"][buyers]
    assert 0.5 < pred.sum() / actual.sum() < 2.5
    assert _auc(pred, actual > 0) > 0.68
    # the top decile of the prediction buys far more than the rest (4.3-36 times, 200 seeds)
    top = pred >= np.quantile(pred, 0.9)
    assert actual[top].mean() > 3 * actual[~top].mean()


def test_medium_calibration(medium):
    """20000 users, over 100 seeds: predicted / actual purchases 0.85-1.29; convert's mean
    prediction / observed 7-day first-purchase rate 0.55-1.49 (its ranking is weak in this
    shop, AUC 0.41-0.73 with about 50 positives to train on, and is not asserted); churn's
    AUC among repeat buyers 0.78-0.85."""
    buyers = medium["n_buy"] >= 1
    pred, actual = medium["expected"][buyers], medium["buys_after"][buyers]
    assert 0.75 < pred.sum() / actual.sum() < 1.45
    conv = ~np.isnan(medium["convert"])
    assert conv.sum() > 1000
    ratio = medium["convert"][conv].mean() / medium["converted_7d"][conv].mean()
    assert 0.4 < ratio < 2.5
    rep = medium["n_buy"] >= 2
    assert _auc(medium["churn"][rep], medium["no_event_30d"][rep]) > 0.72
