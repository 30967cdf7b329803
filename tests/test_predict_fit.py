"""Predictive-score maths (segcore.predict) against published estimates and direct formulas.

Published figures:

* BG/NBD on CDNOW (Fader, Hardie & Lee 2005, "Counting your customers the easy way"):
  r = 0.243, alpha = 4.414, a = 0.793, b = 2.426, LL = -9582.4.
* Gamma-Gamma on CDNOW repeat buyers (Fader, Hardie & Lee 2005, "RFM and CLV"): p = 6.25,
  q = 3.74, gamma = 15.44 (lifetimes' README prints v = 15.45), with lifetimes' README's
  conditional expected average spends and BG/NBD one-week predictions.
"""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.special

from segcore import predict as P

DATA = Path(__file__).parent / "data"
PUBLISHED = P.BGNBD(r=0.243, alpha=4.414, a=0.793, b=2.426)


def _load(name):
    return np.genfromtxt(DATA / name, delimiter=",", names=True)


@pytest.fixture(scope="module")
def cdnow():
    d = _load("cdnow_customers_summary.csv")
    return d["frequency"], d["recency"], d["T"]


@pytest.fixture(scope="module")
def cdnow_ids():
    return _load("cdnow_customers_summary.csv")["ID"].astype(int)


@pytest.fixture(scope="module")
def cdnow_spend():
    d = _load("cdnow_customers_summary_with_transactions.csv")
    return d["x"], d["zbar"]


@pytest.fixture(scope="module")
def bgnbd(cdnow):
    return P.fit_bgnbd(*cdnow)


@pytest.fixture(scope="module")
def gamma_gamma(cdnow_spend):
    x, m = cdnow_spend
    return P.fit_gamma_gamma(x[x > 0], m[x > 0])


def direct_expected_purchases(m, t, x, t_x, T):
    """FHL 2005 eq. 10 evaluated literally with scipy's hyp2f1 (as lifetimes does)."""
    r, alpha, a, b = m.r, m.alpha, m.a, m.b
    hyp = scipy.special.hyp2f1(r + x, b + x, a + b + x - 1, t / (alpha + T + t))
    num = (a + b + x - 1) / (a - 1) * (1 - ((alpha + T) / (alpha + T + t)) ** (r + x) * hyp)
    den = 1 + (x > 0) * a / (b + np.maximum(x, 1) - 1) * ((alpha + T) / (alpha + t_x)) ** (r + x)
    return num / den


def random_histories(rng, n, max_x=30):
    x = rng.integers(0, max_x + 1, n).astype(float)
    T = rng.uniform(0.5, 100.0, n)
    t_x = np.where(x > 0, rng.uniform(0.0, 1.0, n) * T, 0.0)
    return x, t_x, T


# ------------------------------------------------------------------------------------------
# BG/NBD fit

def test_bgnbd_fit_reproduces_fader_hardie_lee(bgnbd):
    assert bgnbd.n == 2357
    assert bgnbd.r == pytest.approx(0.243, abs=1e-3)
    assert bgnbd.alpha == pytest.approx(4.414, abs=1e-2)
    assert bgnbd.a == pytest.approx(0.793, abs=1e-3)
    assert bgnbd.b == pytest.approx(2.426, abs=1e-2)
    assert bgnbd.loglik == pytest.approx(-9582.4, abs=0.1)


def test_bgnbd_fit_is_a_maximum(bgnbd, cdnow):
    ll = bgnbd.loglik
    assert ll == pytest.approx(P.bgnbd_loglik(bgnbd.r, bgnbd.alpha, bgnbd.a, bgnbd.b, *cdnow),
                               rel=1e-12)
    for i, name in enumerate(("r", "alpha", "a", "b")):
        for f in (1 - 1e-4, 1 + 1e-4):
            params = [bgnbd.r, bgnbd.alpha, bgnbd.a, bgnbd.b]
            params[i] *= f
            assert P.bgnbd_loglik(*params, *cdnow) < ll, name


def test_bgnbd_loglik_at_published_parameters(cdnow):
    assert P.bgnbd_loglik(0.243, 4.414, 0.793, 2.426, *cdnow) == pytest.approx(-9582.4, abs=0.1)


def test_bgnbd_loglik_matches_the_likelihood_written_out():
    # FHL 2005 eq. 6 with Beta and Gamma functions, no logs: L = B(a, b+x)/B(a, b)
    # Gamma(r+x) alpha^r / (Gamma(r) (alpha+T)^(r+x)) + [x > 0] B(a+1, b+x-1)/B(a, b)
    # Gamma(r+x) alpha^r / (Gamma(r) (alpha+t_x)^(r+x))
    rng = np.random.default_rng(7)
    B, G = scipy.special.beta, scipy.special.gamma
    for _ in range(20):
        r, alpha, a, b = rng.uniform(0.2, 3.0), rng.uniform(0.5, 10), rng.uniform(0.2, 3.0), \
            rng.uniform(0.5, 5.0)
        x, t_x, T = random_histories(rng, 30, max_x=8)
        common = G(r + x) * alpha ** r / G(r)
        lik = B(a, b + x) / B(a, b) * common / (alpha + T) ** (r + x)
        with np.errstate(invalid="ignore"):
            drop = B(a + 1, b + x - 1) / B(a, b) * common / (alpha + t_x) ** (r + x)
        lik = lik + np.where(x > 0, drop, 0.0)
        w = rng.integers(1, 4, 30)
        expect = float(np.sum(w * np.log(lik)))
        assert P.bgnbd_loglik(r, alpha, a, b, x, t_x, T, weights=w) == pytest.approx(expect,
                                                                                      rel=1e-11)


def test_bgnbd_fit_is_equivariant_in_the_time_unit(bgnbd, cdnow):
    x, t_x, T = cdnow
    days = P.fit_bgnbd(x, 7 * t_x, 7 * T)
    assert days.alpha / 7 == pytest.approx(bgnbd.alpha, rel=1e-7)
    for name in ("r", "a", "b"):
        assert getattr(days, name) == pytest.approx(getattr(bgnbd, name), rel=1e-7)
    # the density of purchase times scales by 1/7 per repeat purchase
    assert days.loglik == pytest.approx(bgnbd.loglik - x.sum() * math.log(7), rel=1e-12)


def test_bgnbd_weights_are_customer_counts(cdnow):
    x, t_x, T = (v[:800] for v in cdnow)
    w = np.arange(800) % 3 + 1
    weighted = P.fit_bgnbd(x, t_x, T, weights=w)
    repeated = P.fit_bgnbd(*(np.repeat(v, w) for v in (x, t_x, T)))
    for name in ("r", "alpha", "a", "b"):
        assert getattr(weighted, name) == pytest.approx(getattr(repeated, name), rel=1e-6)
    assert weighted.loglik == pytest.approx(repeated.loglik, rel=1e-10)
    assert (weighted.n, repeated.n) == (800, int(w.sum()))


# ------------------------------------------------------------------------------------------
# Gamma-Gamma

def test_gamma_gamma_fit_reproduces_published_estimates(gamma_gamma):
    assert gamma_gamma.n == 946
    assert gamma_gamma.p == pytest.approx(6.25, abs=0.01)
    assert gamma_gamma.q == pytest.approx(3.74, abs=0.01)
    # FHL 2005 (RFM and CLV) print gamma = 15.44, lifetimes' README v = 15.45
    assert gamma_gamma.v == pytest.approx(15.44, abs=0.01)
    assert gamma_gamma.v == pytest.approx(15.45, abs=0.01)


def test_gamma_gamma_fit_is_a_maximum(gamma_gamma, cdnow_spend):
    x, m = cdnow_spend
    x, m = x[x > 0], m[x > 0]
    g = gamma_gamma
    assert g.loglik == pytest.approx(P.gamma_gamma_loglik(g.p, g.q, g.v, x, m), rel=1e-12)
    for i in range(3):
        for f in (1 - 1e-4, 1 + 1e-4):
            params = [g.p, g.q, g.v]
            params[i] *= f
            assert P.gamma_gamma_loglik(*params, x, m) < g.loglik


def test_gamma_gamma_fit_scales_with_the_currency(gamma_gamma, cdnow_spend):
    x, m = cdnow_spend
    cents = P.fit_gamma_gamma(x[x > 0], 100 * m[x > 0])
    assert cents.p == pytest.approx(gamma_gamma.p, rel=1e-6)
    assert cents.q == pytest.approx(gamma_gamma.q, rel=1e-6)
    assert cents.v / 100 == pytest.approx(gamma_gamma.v, rel=1e-6)


def test_expected_spend_matches_lifetimes_readme(gamma_gamma, cdnow_spend):
    x, m = cdnow_spend
    got = P.expected_spend(gamma_gamma, x[:10], m[:10])
    # customers 1-10; x == 0 (customers 3, 4, 5, 8, 10) get the population mean
    published = [24.658616, 18.911480, 35.171003, 35.171003, 35.171003, 71.462851, 18.911480,
                 35.171003, 27.282408, 35.171003]
    np.testing.assert_allclose(got, published, rtol=1e-6)


def test_expected_spend_formula(gamma_gamma):
    g = gamma_gamma
    x = np.array([0.0, 0.0, 1.0, 3.0, 50.0])
    m = np.array([np.nan, 10.0, 10.0, 40.0, 25.0])
    got = P.expected_spend(g, x, m)
    assert got[0] == got[1] == pytest.approx(g.p * g.v / (g.q - 1), rel=1e-15)
    w = g.p * x[2:] / (g.p * x[2:] + g.q - 1)  # weight of the customer's own mean
    np.testing.assert_allclose(got[2:], w * m[2:] + (1 - w) * g.p * g.v / (g.q - 1), rtol=1e-14)
    assert P.expected_spend(g, 2, 30.0).shape == ()


# ------------------------------------------------------------------------------------------
# scorers

def test_expected_purchases_matches_lifetimes_readme(bgnbd, cdnow, cdnow_ids):
    # lifetimes README: the five CDNOW customers with most expected purchases next week
    published = {509: (18, 35.14, 35.86, 0.424877), 841: (19, 34.00, 34.14, 0.474738),
                 1981: (17, 28.43, 28.86, 0.486526), 157: (29, 37.71, 38.00, 0.662396),
                 1516: (26, 30.86, 31.00, 0.710623)}
    x, t_x, T = cdnow
    rows = [int(np.flatnonzero(cdnow_ids == i)[0]) for i in published]
    np.testing.assert_array_equal(np.column_stack([x, t_x, T])[rows],
                                  [v[:3] for v in published.values()])
    got = P.expected_purchases(bgnbd, 1.0, x[rows], t_x[rows], T[rows])
    np.testing.assert_allclose(got, [v[3] for v in published.values()], atol=1e-6)
    top5 = np.sort(P.expected_purchases(bgnbd, 1.0, x, t_x, T))[-5:]
    np.testing.assert_allclose(top5, [v[3] for v in published.values()], atol=1e-6)


def test_expected_purchases_first_cdnow_customer():
    # the customer with x = 2, t_x = 30.43, T = 38.86 over the next 39 weeks: the direct
    # formula with scipy's hyp2f1 gives 1.22603 at the published parameters
    got = float(P.expected_purchases(PUBLISHED, 39.0, 2, 30.43, 38.86))
    assert got == pytest.approx(float(direct_expected_purchases(PUBLISHED, 39.0, 2, 30.43, 38.86)),
                                rel=1e-12)
    assert round(got, 3) == 1.226


def test_expected_purchases_matches_hyp2f1_formula():
    rng = np.random.default_rng(2024)
    a_values = np.concatenate([rng.uniform(0.05, 0.99, 40), rng.uniform(1.01, 6.0, 40),
                               1 + rng.choice([-1, 1], 20) * rng.uniform(5e-3, 5e-2, 20)])
    for a in a_values:
        m = P.BGNBD(r=rng.uniform(0.05, 5.0), alpha=rng.uniform(0.1, 50.0), a=float(a),
                    b=rng.uniform(0.1, 10.0))
        x, t_x, T = random_histories(rng, 40)
        t = rng.uniform(0.0, 200.0, 40)
        np.testing.assert_allclose(P.expected_purchases(m, t, x, t_x, T),
                                   direct_expected_purchases(m, t, x, t_x, T), rtol=1e-9)


def test_expected_purchases_is_continuous_at_a_equal_1():
    rng = np.random.default_rng(5)
    x, t_x, T = random_histories(rng, 200)
    t = rng.uniform(0.0, 100.0, 200)
    at1 = P.expected_purchases(P.BGNBD(0.5, 3.0, 1.0, 2.0), t, x, t_x, T)
    assert np.all(np.isfinite(at1)) and np.all(at1 >= 0)
    for a in (1 - 1e-9, 1 + 1e-9, 1 - 1e-13, 1 + 1e-13):
        near = P.expected_purchases(P.BGNBD(0.5, 3.0, a, 2.0), t, x, t_x, T)
        np.testing.assert_allclose(near, at1, rtol=1e-8)


def test_expected_purchases_properties(bgnbd):
    rng = np.random.default_rng(11)
    x, t_x, T = random_histories(rng, 500, max_x=60)
    assert np.all(P.expected_purchases(bgnbd, 0.0, x, t_x, T) == 0.0)
    e1 = P.expected_purchases(bgnbd, 10.0, x, t_x, T)
    e2 = P.expected_purchases(bgnbd, 20.0, x, t_x, T)
    assert np.all(e1 > 0) and np.all(e2 > e1)
    # older at the same history: less likely alive, lower rate -> fewer purchases
    assert np.all(P.expected_purchases(bgnbd, 10.0, x, t_x, T + 5.0) < e1)
    # bounded by P(alive) times the alive customer's posterior mean rate (r+x)/(alpha+T) times t
    bound = P.p_alive(bgnbd, x, t_x, T) * (bgnbd.r + x) / (bgnbd.alpha + T) * 10.0
    assert np.all(e1 < bound)


def test_expected_purchases_large_x_and_broadcasting(bgnbd):
    x = np.array([[500.0], [5_000.0], [100_000.0]])
    t = np.array([1.0, 39.0])
    got = P.expected_purchases(bgnbd, t, x, 38.0, 38.0)  # last purchase right at T
    assert got.shape == (3, 2)
    assert np.all(np.isfinite(got)) and np.all(got > 0)
    bound = (bgnbd.r + x) / (bgnbd.alpha + 38.0) * t
    assert np.all(got < bound) and np.all(got > 0.5 * bound)
    lapsed = P.expected_purchases(bgnbd, 39.0, x.ravel(), 20.0, 38.0)
    assert np.all(lapsed >= 0) and np.all(lapsed < 1e-50)
    assert P.expected_purchases(bgnbd, 5.0, 2, 30.43, 38.86).shape == ()


def test_p_alive(bgnbd):
    rng = np.random.default_rng(3)
    x, t_x, T = random_histories(rng, 500)
    pa = P.p_alive(bgnbd, x, t_x, T)
    assert np.all(pa[x == 0] == 1.0)
    assert np.all((pa > 0) & (pa <= 1))
    later = P.p_alive(bgnbd, x, t_x, T + 1.0)
    assert np.all(later[x > 0] < pa[x > 0]) and np.all(later[x == 0] == 1.0)
    # just bought: odds a/(b+x-1) of having dropped out at that purchase
    got = P.p_alive(bgnbd, np.array([1.0, 4.0]), 10.0, 10.0)
    np.testing.assert_allclose(got, 1 / (1 + bgnbd.a / (bgnbd.b + np.array([0.0, 3.0]))),
                               rtol=1e-15)
    assert float(P.p_alive(bgnbd, 10_000, 1.0, 100.0)) == 0.0  # overflow-safe


# ------------------------------------------------------------------------------------------
# logistic regression

def test_fit_logistic_recovers_coefficients():
    rng = np.random.default_rng(42)
    n = 200_000
    X = rng.normal(size=(n, 3))
    truth = np.array([-1.0, 0.5, -2.0, 1.0])
    y = (rng.random(n) < scipy.special.expit(truth[0] + X @ truth[1:])).astype(int)
    fit = P.fit_logistic(X, y, l2=1.0)
    assert len(fit.coef) == 4
    np.testing.assert_allclose(fit.coef, truth, atol=0.03)
    assert (fit.n, fit.positives) == (n, int(y.sum()))
    eta = fit.coef[0] + X @ np.array(fit.coef[1:])
    assert fit.loglik == pytest.approx(float(np.sum(y * eta - np.logaddexp(0, eta))), rel=1e-12)


def test_fit_logistic_penalty_spares_the_intercept():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(5_000, 2))
    y = (rng.random(5_000) < 0.2).astype(bool)
    fit = P.fit_logistic(X, y, l2=1e9)
    assert np.all(np.abs(fit.coef[1:]) < 1e-5)
    assert fit.coef[0] == pytest.approx(math.log(y.mean() / (1 - y.mean())), abs=1e-4)
    # weights are row counts
    w = rng.integers(1, 4, 5_000)
    weighted = P.fit_logistic(X, y, weights=w)
    repeated = P.fit_logistic(np.repeat(X, w, axis=0), np.repeat(y, w))
    np.testing.assert_allclose(weighted.coef, repeated.coef, atol=1e-6)


def test_fit_logistic_errors():
    X = np.zeros((4, 1))
    with pytest.raises(ValueError, match="needs both outcomes"):
        P.fit_logistic(X, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="needs both outcomes"):
        P.fit_logistic(X, [0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"X must be 2-D \(n, k\), got shape \(4,\)"):
        P.fit_logistic(np.zeros(4), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="y must be 1-D with 4 entries"):
        P.fit_logistic(X, [0, 1, 0])
    with pytest.raises(ValueError, match="y must contain only 0/1 outcomes"):
        P.fit_logistic(X, [0, 1, 2, 1])
    with pytest.raises(ValueError, match="X must be finite"):
        P.fit_logistic(np.full((4, 1), np.nan), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0"):
        P.fit_logistic(X, [0, 1, 0, 1], l2=-1)


# ------------------------------------------------------------------------------------------
# input validation

@pytest.mark.parametrize("x, t_x, T, message", [
    ([1, 2], [1.0], [2.0, 3.0], "arrays must have equal lengths, got x=2, t_x=1, T=2"),
    ([[1, 2]], [[1.0, 1.0]], [[2.0, 2.0]], r"x must be a 1-D array, got shape \(1, 2\)"),
    ([1, np.nan], [1.0, 1.0], [2.0, 2.0], r"x must be finite \(no NaN or inf\)"),
    ([1, 2], [1.0, 1.0], [2.0, np.inf], r"T must be finite \(no NaN or inf\)"),
    ([1, -1], [1.0, 0.0], [2.0, 2.0], r"x \(repeat purchases\) must be non-negative integers"),
    ([1, 1.5], [1.0, 1.0], [2.0, 2.0], r"x \(repeat purchases\) must be non-negative integers"),
    ([1, 1], [1.0, 3.0], [2.0, 2.0], "need 0 <= t_x <= T for every customer"),
    ([1, 1], [1.0, -1.0], [2.0, 2.0], "need 0 <= t_x <= T for every customer"),
    ([1, 0], [1.0, 1.0], [2.0, 2.0], r"t_x must be 0 when x == 0 \(no repeat purchase\)"),
    ([1], [1.0], [2.0], "fit_bgnbd needs at least 2 customers"),
    ([0, 0], [0.0, 0.0], [2.0, 2.0],
     r"fit_bgnbd needs at least one customer with a repeat purchase \(x > 0\)"),
])
def test_fit_bgnbd_validates_input(x, t_x, T, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        P.fit_bgnbd(x, t_x, T)


def test_fit_bgnbd_validates_weights_and_loglik_parameters():
    with pytest.raises(ValueError, match=r"^weights has length 1, expected 2$"):
        P.fit_bgnbd([1, 0], [1.0, 0.0], [2.0, 2.0], weights=[1])
    with pytest.raises(ValueError, match=r"^weights must be >= 0 with at least one > 0$"):
        P.fit_bgnbd([1, 0], [1.0, 0.0], [2.0, 2.0], weights=[1, -1])
    with pytest.raises(ValueError, match="^BG/NBD parameters must be positive and finite"):
        P.bgnbd_loglik(0.0, 1.0, 1.0, 1.0, [1], [1.0], [2.0])


@pytest.mark.parametrize("x, m, message", [
    ([1, 0], [5.0, 5.0], r"Gamma-Gamma needs x > 0 \(customers with repeat purchases only\)"),
    ([1, 2], [5.0, 0.0], r"Gamma-Gamma needs m > 0 \(positive mean transaction value\)"),
    ([1, 2], [5.0, -3.0], r"Gamma-Gamma needs m > 0 \(positive mean transaction value\)"),
    ([1, 2], [5.0], "arrays must have equal lengths, got x=2, m=1"),
    ([1, 2], [5.0, np.nan], r"m must be finite \(no NaN or inf\)"),
    ([1], [5.0], "fit_gamma_gamma needs at least 2 customers"),
])
def test_fit_gamma_gamma_validates_input(x, m, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        P.fit_gamma_gamma(x, m)


# ------------------------------------------------------------------------------------------
# without scipy

def test_module_works_without_scipy(monkeypatch, cdnow, bgnbd, gamma_gamma, cdnow_spend):
    # Block every scipy module, then execute a fresh copy of segcore/predict.py under another
    # name (rather than reloading segcore.predict, which would replace its classes for the
    # rest of the session).
    for name in [k for k in sys.modules if k == "scipy" or k.startswith("scipy.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(ImportError):
        import scipy.special  # noqa: F401
    spec = importlib.util.spec_from_file_location("_segcore_predict_noscipy", P.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    m = mod.BGNBD(bgnbd.r, bgnbd.alpha, bgnbd.a, bgnbd.b)
    x, t_x, T = cdnow
    np.testing.assert_array_equal(mod.p_alive(m, x, t_x, T), P.p_alive(bgnbd, x, t_x, T))
    np.testing.assert_array_equal(mod.expected_purchases(m, 39.0, x, t_x, T),
                                  P.expected_purchases(bgnbd, 39.0, x, t_x, T))
    g = mod.GammaGamma(gamma_gamma.p, gamma_gamma.q, gamma_gamma.v)
    xs, ms = cdnow_spend
    np.testing.assert_array_equal(mod.expected_spend(g, xs, ms),
                                  P.expected_spend(gamma_gamma, xs, ms))
    # the likelihoods fall back to math.lgamma
    assert mod.bgnbd_loglik(m.r, m.alpha, m.a, m.b, x, t_x, T) == pytest.approx(bgnbd.loglik,
                                                                                rel=1e-12)
    sel = xs > 0
    assert mod.gamma_gamma_loglik(g.p, g.q, g.v, xs[sel], ms[sel]) == pytest.approx(
        gamma_gamma.loglik, rel=1e-12)

    with pytest.raises(ImportError, match=r"segcore\[predict\]"):
        mod.fit_bgnbd(x, t_x, T)
    with pytest.raises(ImportError, match=r"segcore\[predict\]"):
        mod.fit_gamma_gamma(xs[sel], ms[sel])
    with pytest.raises(ImportError, match=r"segcore\[predict\]"):
        mod.fit_logistic(np.zeros((2, 1)), [0, 1])
