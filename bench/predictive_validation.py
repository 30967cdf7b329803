"""How good are the built-in predictive scores? Out-of-time validation on a synthetic shop.

Generates a :mod:`segcore.synth` workload, feeds the events before a cutoff into
``segcore.Engine(predictive=True)``, fits the models there (``fit_predictive``) and scores every
user at the cutoff; then compares the scores with what happens after the cutoff:

* ``churn`` (BG/NBD, buyers only) against "no event of any type in the next 30 days", next to
  two plain heuristics computed from the same history: days since the user's last event, and
  days since their last purchase; and against the generator's own truth, "the user's lifetime
  ended before the cutoff" (``Workload.active_until < cutoff``);
* ``expected_purchases_<h>`` against the purchases in the next ``h`` days (``h`` = 90, or the
  period left after the cutoff when shorter: the engine is then built with that horizon), by
  decile of the prediction and overall; likewise ``ltv_<h>`` against the spend;
* ``convert`` against "first purchase within 7 days of the cutoff" (users without a purchase
  before the cutoff and active in its last 7 days): by decile, AUC and base rate;
* ``p_alive`` by decile next to the share of users with any event after the cutoff (a sanity
  check, not a calibration: P(alive) is not P(event soon)).

AUCs are Mann-Whitney statistics on numpy ranks (ties count one half). The synthetic shop is
*not* a BG/NBD world: each user has an exponential lifetime and spreads a Zipf-distributed
number of events (2.5 % of them purchases) uniformly over it, so the scores are tested
out of model.

    PYTHONPATH=python python bench/predictive_validation.py --seed 0 \\
        --plot docs/predictive.png --json /tmp/predictive.json

Needs scipy (fitting) and, for ``--plot``, matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

import segcore
from segcore.synth import EVENT_TYPES, generate

DAY_MS = 86_400_000
PURCHASE = EVENT_TYPES.index("purchase")


# ----------------------------------------------------------------------------- statistics
def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties given their average rank."""
    x = np.asarray(x, dtype=float)
    n = x.shape[0]
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.ones(n, dtype=bool)
    new[1:] = xs[1:] != xs[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], n)
    avg = (starts + ends + 1) / 2.0          # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n)
    ranks[order] = avg[np.cumsum(new) - 1]
    return ranks


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties 1/2 (Mann-Whitney U / n1 n0)."""
    score = np.asarray(score, dtype=float)
    label = np.asarray(label, dtype=bool)
    n1 = int(label.sum())
    n0 = label.shape[0] - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = average_ranks(score)
    return float((r[label].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_curve(score: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1)."""
    score = np.asarray(score, dtype=float)
    label = np.asarray(label, dtype=bool)
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], label[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.append(s[1:] != s[:-1], True)       # the end of each run of equal scores
    tpr = np.concatenate([[0.0], tp[last] / max(1, y.sum())])
    fpr = np.concatenate([[0.0], fp[last] / max(1, (~y).sum())])
    return fpr, tpr


def deciles(pred: np.ndarray, *actual: np.ndarray, k: int = 10) -> list[dict]:
    """Rows sorted by ``pred`` cut into ``k`` groups of (almost) equal size: per group its
    size, the prediction's range and mean, and the mean of each ``actual`` with its standard
    error (ties of ``pred`` are split by row order)."""
    order = np.argsort(pred, kind="mergesort")
    out = []
    for i, idx in enumerate(np.array_split(order, k)):
        if idx.size == 0:
            continue
        row = {"decile": i + 1, "n": int(idx.size), "pred_min": float(pred[idx].min()),
               "pred_max": float(pred[idx].max()), "pred_mean": float(pred[idx].mean())}
        for j, a in enumerate(actual):
            sfx = "" if j == 0 else str(j + 1)
            row[f"actual_mean{sfx}"] = float(a[idx].mean())
            row[f"actual_se{sfx}"] = float(a[idx].std(ddof=1) / math.sqrt(idx.size)) \
                if idx.size > 1 else float("nan")
        out.append(row)
    return out


# ----------------------------------------------------------------------------- the run
def per_user_last(user: np.ndarray, ts: np.ndarray, n: int) -> np.ndarray:
    """Latest ``ts`` per user id (INT64_MIN where none)."""
    out = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(out, user.astype(np.int64), ts)
    return out


def run(users: int, events: int, days: float, cutoff_days: float, seed: int,
        batch: int = 100_000, l2: float = 1.0, verbose: bool = True) -> dict:
    """Generate, ingest up to the cutoff, fit, score and compare; every number in a dict
    (with a few arrays under the ``"_arrays"`` key for plotting)."""
    if not 0 < cutoff_days < days:
        raise SystemExit(f"--cutoff-days must be in (0, --days), got {cutoff_days} / {days}")
    say = print if verbose else (lambda *a, **k: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    w = generate(users, events, days=days, seed=seed)
    timings["generate_s"] = time.perf_counter() - t0
    n = w.n_users
    cutoff = w.start_ms + int(round(cutoff_days * DAY_MS))
    left_ms = w.end_ms - cutoff                  # the period observed after the cutoff
    horizon_ms = min(90 * DAY_MS, left_ms)
    horizon_ms -= horizon_ms % 3_600_000 if horizon_ms > 3_600_000 else 0   # whole hours
    horizon_days = horizon_ms / DAY_MS
    churn_ms = min(30 * DAY_MS, left_ms)
    conv_ms = min(7 * DAY_MS, left_ms)

    # ---- ingest the history, fit, score
    spec = True if horizon_ms == 90 * DAY_MS else {
        "horizon": f"{horizon_ms // DAY_MS}d" if horizon_ms % DAY_MS == 0 else
        f"{horizon_ms // 3_600_000}h"}
    eng = segcore.Engine(predictive=spec)
    t0 = time.perf_counter()
    n_in = 0
    for b in w.batches(batch):
        m = b.ts < cutoff
        if not m.any():
            continue
        eng.track_many(user=b.user[m], event=b.event[m], ts=b.ts[m],
                       props={"amount": b.num_props["amount"][m]})
        n_in += int(m.sum())
    eng.advance(cutoff)
    timings["ingest_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    eng.fit_predictive(l2=l2)
    timings["fit_s"] = time.perf_counter() - t0
    model = eng.predictive_model
    t0 = time.perf_counter()
    sc = eng.predictive_scores()
    timings["score_s"] = time.perf_counter() - t0
    exp_key = next(k for k in sc if k.startswith("expected_purchases_"))
    ltv_key = next(k for k in sc if k.startswith("ltv_"))

    def column(name: str) -> np.ndarray:
        out = np.full(n, np.nan)
        out[sc["user"].astype(np.int64)] = sc[name]
        return out

    churn, p_alive = column("churn"), column("p_alive")
    expected, ltv, convert = column(exp_key), column(ltv_key), column("convert")

    # ---- history (before the cutoff) and outcome (after it) from the workload
    u = w.user.astype(np.int64)
    buy = w.event_code == PURCHASE
    amount = np.nan_to_num(w.num_props["amount"])
    pre, post = w.ts < cutoff, w.ts >= cutoff
    n_buy_pre = np.bincount(u[pre & buy], minlength=n)
    seen_pre = np.bincount(u[pre], minlength=n) > 0
    last_any = per_user_last(u[pre], w.ts[pre], n)
    last_buy = per_user_last(u[pre & buy], w.ts[pre & buy], n)
    rec_any = (cutoff - last_any) / DAY_MS
    rec_buy = (cutoff - last_buy) / DAY_MS
    in_churn = post & (w.ts < cutoff + churn_ms)
    any_churn_win = np.bincount(u[in_churn], minlength=n) > 0
    any_after = np.bincount(u[post], minlength=n) > 0
    in_h = post & buy & (w.ts < cutoff + horizon_ms)
    buys_h = np.bincount(u[in_h], minlength=n).astype(float)
    spend_h = np.bincount(u[in_h], weights=amount[in_h], minlength=n)
    in_c = post & buy & (w.ts < cutoff + conv_ms)
    conv_7 = np.bincount(u[in_c], minlength=n) > 0
    # the window the convert model is trained for: the 7 UTC days after the cutoff's day
    D = cutoff // DAY_MS
    in_c2 = buy & (w.ts >= (D + 1) * DAY_MS) & (w.ts < (D + 8) * DAY_MS)
    conv_days = np.bincount(u[in_c2], minlength=n) > 0
    gone = w.active_until < cutoff

    # ---- churn among buyers
    buyers = ~np.isnan(churn)
    consistent = bool(np.array_equal(buyers, n_buy_pre >= 1))
    repeat = buyers & (n_buy_pre >= 2)
    lab = ~any_churn_win
    churn_res: dict = {
        "label": f"no event of any type in [cutoff, cutoff + {churn_ms / DAY_MS:g} d)",
        "n_buyers": int(buyers.sum()), "n_repeat_buyers": int(repeat.sum()),
        "n_one_time_buyers": int((buyers & ~repeat).sum()),
        "buyers_match_history": consistent,
        "positive_rate": float(lab[buyers].mean()),
    }
    for name, sub in (("all_buyers", buyers), ("repeat_buyers", repeat)):
        churn_res[name] = {
            "n": int(sub.sum()), "positive_rate": float(lab[sub].mean()),
            "auc_churn": auc(churn[sub], lab[sub]),
            "auc_days_since_last_event": auc(rec_any[sub], lab[sub]),
            "auc_days_since_last_purchase": auc(rec_buy[sub], lab[sub]),
        }
    truth: dict = {"label": "truly gone: active_until < cutoff (the generator's lifetime)",
                   "positive_rate_buyers": float(gone[buyers].mean())}
    for name, sub in (("all_buyers", buyers), ("repeat_buyers", repeat)):
        truth[name] = {
            "n": int(sub.sum()), "positive_rate": float(gone[sub].mean()),
            "auc_churn": auc(churn[sub], gone[sub]),
            "auc_days_since_last_event": auc(rec_any[sub], gone[sub]),
            "auc_days_since_last_purchase": auc(rec_buy[sub], gone[sub]),
        }

    # ---- expected purchases and value
    e_b, a_b, s_b, l_b = expected[buyers], buys_h[buyers], spend_h[buyers], ltv[buyers]
    newcomers = seen_pre & ~buyers
    exp_res = {
        "score": exp_key, "horizon_days": horizon_days,
        "horizon_note": ("90 days after the cutoff" if horizon_ms == 90 * DAY_MS else
                         f"the {horizon_days:g} days left after the cutoff (the workload "
                         "does not cover 90; the engine was built with this horizon)"),
        "n_buyers": int(buyers.sum()),
        "mean_predicted": float(e_b.mean()), "mean_actual": float(a_b.mean()),
        "sum_predicted": float(e_b.sum()), "sum_actual": float(a_b.sum()),
        "ratio_predicted_to_actual": float(e_b.sum() / max(a_b.sum(), 1e-12)),
        "auc_any_purchase": auc(e_b, a_b > 0),
        "corr_pearson": float(np.corrcoef(e_b, a_b)[0, 1]),
        "corr_spearman": float(np.corrcoef(average_ranks(e_b), average_ranks(a_b))[0, 1]),
        "mae": float(np.abs(e_b - a_b).mean()),
        "deciles": deciles(e_b, a_b),
        "purchases_by_non_buyers": float(buys_h[newcomers].sum()),
        "purchases_by_users_unseen_before": float(buys_h[~seen_pre].sum()),
    }
    ltv_res = {
        "score": ltv_key, "n_buyers": int(buyers.sum()),
        "mean_predicted": float(l_b.mean()), "mean_actual": float(s_b.mean()),
        "ratio_predicted_to_actual": float(l_b.sum() / max(s_b.sum(), 1e-12)),
        "corr_spearman": float(np.corrcoef(average_ranks(l_b), average_ranks(s_b))[0, 1]),
        "deciles": deciles(l_b, s_b),
        "note": "amounts are in each purchase's currency (EUR, SEK, USD), as the engine sees them",
    }

    # ---- convert
    cpop = ~np.isnan(convert)
    c_p, c_y, c_y2 = convert[cpop], conv_7[cpop], conv_days[cpop]
    conv_res = {
        "label": f"first purchase in [cutoff, cutoff + {conv_ms / DAY_MS:g} d)",
        "n": int(cpop.sum()),
        "base_rate": float(c_y.mean()) if c_y.size else float("nan"),
        "mean_predicted": float(c_p.mean()) if c_p.size else float("nan"),
        "auc": auc(c_p, c_y),
        "brier": float(((c_p - c_y) ** 2).mean()) if c_y.size else float("nan"),
        "deciles": deciles(c_p, c_y.astype(float)) if c_p.size else [],
        "model_window": {"label": "first purchase in the 7 UTC days after the cutoff's day "
                                  "(the window convert is trained for)",
                         "base_rate": float(c_y2.mean()) if c_y2.size else float("nan"),
                         "auc": auc(c_p, c_y2)},
        "population_has_no_purchase_before": bool((n_buy_pre[cpop] == 0).all()),
    }

    # ---- p_alive sanity check
    pa_b = p_alive[buyers]
    alive_res = {
        "note": "sanity check, not calibration: P(alive) is not P(event after the cutoff); "
                "'alive' here is the generator's active_until >= cutoff",
        "mean_p_alive": float(pa_b.mean()),
        "share_any_event_after": float(any_after[buyers].mean()),
        "share_truly_alive": float((~gone[buyers]).mean()),
        "share_p_alive_1": float((pa_b >= 1.0).mean()),
        "deciles": deciles(pa_b, any_after[buyers].astype(float), (~gone[buyers]).astype(float)),
    }

    bg, gg, lr = model.bgnbd, model.gamma_gamma, model.convert
    out = {
        "args": {"users": users, "events": events, "days": days, "cutoff_days": cutoff_days,
                 "seed": seed, "batch": batch, "l2": l2},
        "workload": {"n_events": len(w), "events_before_cutoff": n_in,
                     "users_seen_before_cutoff": int(seen_pre.sum()),
                     "purchases_before_cutoff": int((pre & buy).sum()),
                     "days_after_cutoff": left_ms / DAY_MS,
                     "users_truly_alive_at_cutoff": int((seen_pre & ~gone).sum())},
        "model": {
            "bgnbd": None if bg is None else {"r": bg.r, "alpha_days": bg.alpha, "a": bg.a,
                                              "b": bg.b, "loglik": bg.loglik, "n": bg.n},
            "gamma_gamma": None if gg is None else {"p": gg.p, "q": gg.q, "v": gg.v,
                                                    "loglik": gg.loglik, "n": gg.n},
            "convert": None if lr is None else {
                "coef": list(lr.coef), "n": lr.n, "positives": lr.positives,
                "coef_names": ["intercept"] + [f"log1p({e}, 7d)" for e in
                                               ("product_view", "add_to_cart", "email_click")]
                + ["active_days/7", "days_since_active/7"]},
            "skipped": dict(model.skipped),
        },
        "churn_vs_no_event": churn_res,
        "churn_vs_truth": truth,
        "expected_purchases": exp_res,
        "ltv": ltv_res,
        "convert": conv_res,
        "p_alive_sanity": alive_res,
        "timings": timings,
        "_arrays": {"churn": churn[buyers], "rec_any": rec_any[buyers],
                    "rec_buy": rec_buy[buyers], "no_event": lab[buyers]},
    }
    timings["total_s"] = sum(timings.values())
    return out


# ----------------------------------------------------------------------------- output
def _f(x: float, d: int = 3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def summary(res: dict) -> str:
    a, wl, m = res["args"], res["workload"], res["model"]
    L = []
    L.append(f"workload: {a['users']:,} users, {a['events']:,} events over {a['days']:g} days, "
             f"seed {a['seed']}; cutoff at day {a['cutoff_days']:g} "
             f"({wl['days_after_cutoff']:g} days observed after it)")
    L.append(f"  before the cutoff: {wl['events_before_cutoff']:,} events, "
             f"{wl['users_seen_before_cutoff']:,} users, "
             f"{wl['purchases_before_cutoff']:,} purchases")
    bg, gg, lr = m["bgnbd"], m["gamma_gamma"], m["convert"]
    L.append("fitted model" + (f" (skipped: {m['skipped']})" if m["skipped"] else
                               " (nothing skipped)"))
    if bg:
        L.append(f"  BG/NBD      r={bg['r']:.4g} alpha={bg['alpha_days']:.4g} d a={bg['a']:.4g} "
                 f"b={bg['b']:.4g}  (LL {bg['loglik']:.1f}, {bg['n']:,} buyers)")
    if gg:
        L.append(f"  Gamma-Gamma p={gg['p']:.4g} q={gg['q']:.4g} v={gg['v']:.4g}  "
                 f"({gg['n']:,} repeat buyers)")
    if lr:
        L.append("  convert     " + " ".join(f"{nm}={c:+.3f}" for nm, c in
                                             zip(lr["coef_names"], lr["coef"]))
                 + f"  ({lr['n']:,} rows, {lr['positives']} positive)")
    c = res["churn_vs_no_event"]
    L.append(f"churn, buyers: {c['n_buyers']:,} ({c['n_repeat_buyers']:,} repeat, "
             f"{c['n_one_time_buyers']:,} one-time: churn = 0, p_alive = 1)")
    L.append(f"  {'AUC':15s} {'churn':>7s} {'days since':>11s} {'days since':>11s}")
    L.append(f"  {'':15s} {'':>7s} {'last event':>11s} {'last buy':>11s}")
    for title, block in ((c["label"], c), ("truly gone: active_until < cutoff",
                                           res["churn_vs_truth"])):
        L.append(f"  label: {title}")
        for sub in ("all_buyers", "repeat_buyers"):
            b = block[sub]
            L.append(f"  {sub:15s} {_f(b['auc_churn']):>7s} "
                     f"{_f(b['auc_days_since_last_event']):>11s} "
                     f"{_f(b['auc_days_since_last_purchase']):>11s}   "
                     f"(n={b['n']:,}, {100 * b['positive_rate']:.1f} % positive)")
    e = res["expected_purchases"]
    L.append(f"{e['score']} over {e['horizon_note']}:")
    L.append(f"  buyers: mean predicted {_f(e['mean_predicted'])} vs actual "
             f"{_f(e['mean_actual'])} (ratio {_f(e['ratio_predicted_to_actual'])}); "
             f"AUC(any purchase) {_f(e['auc_any_purchase'])}, Spearman "
             f"{_f(e['corr_spearman'])}")
    L.append("  decile   predicted   actual")
    for r in e["deciles"]:
        L.append(f"  {r['decile']:>6d} {r['pred_mean']:>11.3f} {r['actual_mean']:>8.3f}")
    L.append(f"  (not predicted: {e['purchases_by_non_buyers']:.0f} purchases by users seen "
             f"without a purchase, {e['purchases_by_users_unseen_before']:.0f} by users unseen "
             f"before the cutoff)")
    lv = res["ltv"]
    L.append(f"{lv['score']}: mean predicted {lv['mean_predicted']:.2f} vs actual spend "
             f"{lv['mean_actual']:.2f} (ratio {_f(lv['ratio_predicted_to_actual'])}), Spearman "
             f"{_f(lv['corr_spearman'])}")
    cv = res["convert"]
    L.append(f"convert ({cv['n']:,} non-buyers active in the last 7 days), {cv['label']}:")
    L.append(f"  base rate {_f(cv['base_rate'], 4)}, mean predicted {_f(cv['mean_predicted'], 4)}"
             f", AUC {_f(cv['auc'])}, Brier {_f(cv['brier'], 4)}; in the model's window "
             f"(7 UTC days after the cutoff's day): base rate "
             f"{_f(cv['model_window']['base_rate'], 4)}, AUC {_f(cv['model_window']['auc'])}")
    L.append("  decile   predicted  observed")
    for r in cv["deciles"]:
        L.append(f"  {r['decile']:>6d} {r['pred_mean']:>11.4f} {r['actual_mean']:>9.4f}")
    pa = res["p_alive_sanity"]
    L.append("p_alive by decile (buyers) - a sanity check, not calibration:")
    L.append(f"  mean p_alive {_f(pa['mean_p_alive'])}; share with any event after the cutoff "
             f"{_f(pa['share_any_event_after'])}; truly alive {_f(pa['share_truly_alive'])}; "
             f"p_alive = 1 for {100 * pa['share_p_alive_1']:.1f} %")
    L.append("  decile     p_alive  any event after  truly alive")
    for r in pa["deciles"]:
        L.append(f"  {r['decile']:>6d} {r['pred_mean']:>11.3f} {r['actual_mean']:>16.3f} "
                 f"{r['actual_mean2']:>12.3f}")
    t = res["timings"]
    L.append("time: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in t.items()))
    return "\n".join(L)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13.5, 4.3))
    e = res["expected_purchases"]
    p = np.array([r["pred_mean"] for r in e["deciles"]])
    y = np.array([r["actual_mean"] for r in e["deciles"]])
    se = np.nan_to_num(np.array([r["actual_se"] for r in e["deciles"]]))
    pos = y > 0
    lo_ax = 0.5 * min(p.min(), y[pos].min() if pos.any() else p.min())
    top = 2.0 * max(p.max(), y.max())
    ax[0].plot([lo_ax, top], [lo_ax, top], color="0.6", lw=1, ls="--", label="perfect")
    ax[0].errorbar(p[pos], y[pos], yerr=np.minimum(se[pos], 0.999 * y[pos]), fmt="o-",
                   color="C0", ms=5, capsize=2, label="decile of prediction (mean, ±1 s.e.)")
    if (~pos).any():
        ax[0].plot(p[~pos], np.full((~pos).sum(), lo_ax * 1.05), "v", color="C0", mfc="none",
                   label="no purchase at all")
    ax[0].set_xscale("log")
    ax[0].set_yscale("log")
    ax[0].set_xlim(lo_ax, top)
    ax[0].set_ylim(lo_ax, top)
    ax[0].set_xlabel("predicted purchases (mean of decile)")
    ax[0].set_ylabel(f"actual purchases in the next {e['horizon_days']:g} days")
    ax[0].set_title(f"{e['score']}, buyers (n={e['n_buyers']:,}; "
                    f"total {e['sum_predicted']:.0f} vs {e['sum_actual']:.0f})", fontsize=10)
    ax[0].legend(fontsize=8, loc="upper left")

    cv = res["convert"]
    p = np.array([r["pred_mean"] for r in cv["deciles"]])
    y = np.array([r["actual_mean"] for r in cv["deciles"]])
    se = np.nan_to_num(np.array([r["actual_se"] for r in cv["deciles"]]))
    top = max(p.max(), (y + se).max()) * 1.08 if p.size else 1.0
    ax[1].plot([0, top], [0, top], color="0.6", lw=1, ls="--", label="perfect")
    ax[1].errorbar(p, y, yerr=se, fmt="o-", color="C2", ms=5, capsize=2,
                   label="decile of prediction (rate, ±1 s.e.)")
    ax[1].set_xlim(0, top)
    ax[1].set_ylim(0, top)
    ax[1].set_xlabel("predicted P(first purchase in 7 days)")
    ax[1].set_ylabel("observed rate")
    ax[1].set_title(f"convert, active non-buyers (n={cv['n']:,}, AUC {cv['auc']:.3f})",
                    fontsize=10)
    ax[1].legend(fontsize=8, loc="upper left")

    arr, c = res["_arrays"], res["churn_vs_no_event"]["all_buyers"]
    lab = arr["no_event"]
    for key, name, col, a in (("churn", "churn (BG/NBD)", "C3", c["auc_churn"]),
                              ("rec_any", "days since last event", "C0",
                               c["auc_days_since_last_event"]),
                              ("rec_buy", "days since last purchase", "C1",
                               c["auc_days_since_last_purchase"])):
        fpr, tpr = roc_curve(arr[key], lab)
        ax[2].plot(fpr, tpr, color=col, lw=1.5, label=f"{name}: AUC {a:.3f}")
    ax[2].plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
    ax[2].set_xlabel("false positive rate")
    ax[2].set_ylabel("true positive rate")
    ax[2].set_title("ROC, buyers: no event in the next 30 days", fontsize=10)
    ax[2].legend(fontsize=8, loc="lower right")
    a = res["args"]
    fig.suptitle(f"segcore predictive scores, out of time: synthetic shop, {a['users']:,} users, "
                 f"{a['events']:,} events, fitted at day {a['cutoff_days']:g} of "
                 f"{a['days']:g} (seed {a['seed']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20_000, help="default 20000")
    ap.add_argument("--events", type=int, default=400_000, help="default 400000")
    ap.add_argument("--days", type=float, default=150, help="period generated (default 150)")
    ap.add_argument("--cutoff-days", type=float, default=120,
                    help="fit and score at this day; validate on the rest (default 120)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=100_000, help="rows per track_many")
    ap.add_argument("--l2", type=float, default=1.0, help="ridge of the convert model")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG figure")
    ap.add_argument("--json", metavar="PATH", help="write every number as JSON")
    args = ap.parse_args(argv)
    res = run(args.users, args.events, args.days, args.cutoff_days, args.seed,
              batch=args.batch, l2=args.l2)
    print(summary(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_jsonable(res), f, indent=1)
    if args.plot:
        plot(res, args.plot)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
