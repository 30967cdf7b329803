"""Seeded synthetic workloads: the event stream of a web shop, for the demo, tests and benches.

:func:`generate` returns a :class:`Workload`: columns of events in *arrival* order (mostly
ascending ``ts``, with a fraction of late events), the users' traits, and the period they cover.
:data:`DEFAULT_SEGMENTS` are the twelve non-predictive segments of the design (§1), and
:data:`SIZES` the named workload sizes (``medium`` is the canonical benchmark workload: 1M users,
10M events over 120 days, Zipf user activity, ~1 % late events).

The shop, in short:

* **Users** ``0 .. n_users-1``. Activity is Zipf: user weights are ``1 / rank**zipf`` over a
  random permutation of ranks, so heavy users are not the low ids. About 40 % of users (and all
  of the heaviest 1 %) exist from the start; the others arrive uniformly over the period, so some
  are new at the end (``new_users``). Each user has a lifetime (exponential, mean 90 days) after
  which they go quiet (``inactive_30d``). Activity comes in sessions of a few events a few
  minutes apart. Traits: ``country`` (ISO 3166 codes, about 8 % ``"SE"``).
* **Events** ``page_view``, ``product_view`` (``category``, ``product_id``), ``search``,
  ``add_to_cart`` (``cart_id``, ``product_id``), ``purchase`` (``amount``, ``currency``,
  ``cart_id``), ``email_open``, ``email_click``, ``app_open``, ``support_ticket``. Half the users
  never click e-mails and only about a third use the app. Each user favours a category (a
  quarter of them ``"shoes"``) for half of their product views.
* **Carts.** A purchase closes a cart: it follows one of the user's ``add_to_cart`` events by
  a delay of 5 s plus an exponential with mean 20 min (so about 5 % come after more than an
  hour, and the cart abandoner enters then leaves), carrying its ``cart_id``. More than half the
  carts are never bought (they stay abandoned until the user's next purchase). A purchase whose
  cart would be bought after the end of the period (or beyond 60 % of the carts) is a direct buy
  with a cart of its own.
* **Arrival.** An event is *late* with probability ``late_fraction``: it arrives up to
  ``max_late_ms`` after its ``ts``, behind events with larger ``ts``. Rows are ordered by arrival
  time (ties by generation order). In a sparse stream (few events per ``max_late_ms``) a delayed
  event often has nobody to overtake, so fewer rows are actually out of order
  (:attr:`Workload.n_late` counts them); raise ``max_late_ms`` for more.

Everything is vectorised numpy drawn from one ``numpy.random.default_rng(seed)``: the same
arguments give the same workload. Times are int64 ms since the Unix epoch.

>>> from segcore.synth import generate
>>> w = generate(n_users=100, n_events=2_000, seed=7)
>>> len(w), w.n_users, w.ts.dtype, w.user.dtype
(2000, 100, dtype('int64'), dtype('uint32'))
>>> bool((w.start_ms <= w.ts).all() and (w.ts < w.end_ms).all())
True
>>> sorted(w.event_types)[:3]
['add_to_cart', 'app_open', 'email_click']
>>> [len(b) for b in w.batches(750)]
[750, 750, 500]
>>> (generate(100, 2_000, seed=7).ts == w.ts).all()     # deterministic for a seed
np.True_
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping

import numpy as np

__all__ = ["DEFAULT_SEGMENTS", "SIZES", "EVENT_TYPES", "Workload", "generate"]

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MINUTE_MS = 60_000

#: The twelve non-predictive segments of the design table (DESIGN §1), in dependency order.
DEFAULT_SEGMENTS: dict[str, str] = {
    "frequent_buyers": "count(purchase, 90d) >= 3",
    "high_ltv": "sum(purchase.amount) >= 500",
    "high_intent_browsers":
        'count(product_view where category == "shoes", 7d) >= 3 and not did(purchase, 30d)',
    "engaged_app_users": "count(app_open, 7d) >= 5",
    "recent_support_contact": "did(support_ticket, 3d)",
    "inactive_30d": "seen and inactive(30d)",
    "opens_never_clicks": "count(email_open, 30d) >= 3 and count(email_click, 30d) == 0",
    "cart_abandoners": "abandoned(add_to_cart, purchase, 1h)",
    "buying_intent": "count(product_view, 1d) >= 5",
    "new_users": "first_seen >= now - 7d",
    "swedish_frequent_buyers": 'trait.country == "SE" and in(frequent_buyers)',
    "holdout_10pct": "bucket(0, 999)",
}

#: Named sizes ``(n_users, n_events)``; ``medium`` is the canonical workload of DESIGN §6.
SIZES: dict[str, tuple[int, int]] = {
    "tiny": (2_000, 30_000),
    "small": (100_000, 1_000_000),
    "medium": (1_000_000, 10_000_000),
}

#: Event types in code order, with their share of the stream before per-user adjustments
#: (non-clickers' ``email_click`` become ``email_open``, non-app users' ``app_open`` become
#: ``page_view``).
EVENT_TYPES: tuple[str, ...] = (
    "page_view", "product_view", "search", "add_to_cart", "purchase",
    "email_open", "email_click", "app_open", "support_ticket",
)
_EVENT_SHARE = np.array([0.30, 0.28, 0.09, 0.06, 0.025, 0.12, 0.025, 0.095, 0.005])
(_PAGE_VIEW, _PRODUCT_VIEW, _SEARCH, _ADD_TO_CART, _PURCHASE, _EMAIL_OPEN, _EMAIL_CLICK,
 _APP_OPEN, _SUPPORT_TICKET) = range(len(EVENT_TYPES))

_COUNTRIES = ("SE", "DE", "FR", "GB", "US", "NL", "ES", "IT", "PL", "NO", "DK", "FI")
_COUNTRY_SHARE = np.array([0.08, 0.20, 0.12, 0.12, 0.15, 0.06, 0.07, 0.07, 0.05, 0.03, 0.03,
                           0.02])
_CURRENCIES = ("EUR", "SEK", "USD")
_CURRENCY_RATE = np.array([1.0, 11.5, 1.08])          # amounts are in the purchase's currency
_CATEGORIES = ("shoes", "clothing", "electronics", "home", "beauty", "sports", "toys", "books")
_CATEGORY_SHARE = np.array([0.25, 0.22, 0.14, 0.11, 0.09, 0.09, 0.05, 0.05])
_N_PRODUCTS = 2_000

_STR_PROPS = ("currency", "category", "product_id", "cart_id")


class _Props(Mapping):
    """Read-only ``name -> column`` view that builds each string column on first access.

    String properties are kept as int32 codes (``-1`` = absent) into a vocabulary; the object
    array with ``None`` where absent costs 8 bytes a row and is only built when asked for.
    """

    __slots__ = ("_num", "_codes", "_vocab", "_cache")

    def __init__(self, num, codes, vocab):
        self._num = num
        self._codes = codes
        self._vocab = vocab
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._num:
            return self._num[name]
        col = self._cache.get(name)
        if col is None:
            codes = self._codes[name]              # KeyError for an unknown name
            # (indexing, not np.append(vocab, None): a slice costs its rows, not the vocabulary)
            col = np.asarray(self._vocab[name], dtype=object)[codes]
            col[codes < 0] = None
            self._cache[name] = col
        return col

    def __iter__(self):
        yield from self._num
        yield from self._codes

    def __len__(self) -> int:
        return len(self._num) + len(self._codes)

    def __repr__(self) -> str:
        return f"<props {', '.join(self)}>"


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
    """Synthetic events in arrival order, plus users' traits; made by :func:`generate`.

    Attributes
    ----------
    user : numpy.ndarray of uint32
        User id of each event.
    event_code : numpy.ndarray of int32
        Index of each event's type into ``event_types``.
    event_types : list of str
        Event type names (:data:`EVENT_TYPES`).
    ts : numpy.ndarray of int64
        Event time, ms since the epoch, ``start_ms <= ts < end_ms``.
    num_props : dict of str to numpy.ndarray
        Numeric properties, float64 with NaN where absent: ``amount``.
    str_codes, str_vocab : dict of str to numpy.ndarray
        String properties as int32 codes (``-1`` = absent) into an object array of ``str``:
        ``currency``, ``category``, ``product_id``, ``cart_id``. ``props`` decodes them.
    trait_user : numpy.ndarray of uint32
        Every user id, ``0 .. n_users-1`` (including users without events).
    traits : dict of str to numpy.ndarray
        Trait columns aligned with ``trait_user``: ``country`` (``<U2`` ISO codes).
    n_users, start_ms, end_ms : int
        Number of users and the period ``[start_ms, end_ms)`` of the whole workload.
    active_until : numpy.ndarray of int64
        Per user id ``0 .. n_users-1``: the instant after which the generator gives the user no
        more sessions (its lifetime; ``end_ms`` when still alive at the end). Every event of
        the user is before it, except that a purchase closing a cart may follow the cart by a
        few minutes. The ground truth of churn for validating predictive scores.

    A slice (``w[i:j]``, :meth:`batches`) is a ``Workload`` of those rows whose columns are
    views; it keeps the whole workload's traits, ``active_until``, ``n_users`` and period.

    Examples
    --------
    >>> w = generate(n_users=50, n_events=400, seed=3)
    >>> w.event[:2].dtype.kind, w.props["amount"].dtype
    ('U', dtype('float64'))
    >>> purchases = w.event == "purchase"
    >>> bool(np.isfinite(w.props["amount"][purchases]).all())
    True
    >>> bool(np.isnan(w.props["amount"][~purchases]).all())
    True
    >>> w.props["category"][w.event == "search"][:1]
    array([None], dtype=object)
    >>> sorted(w.props)
    ['amount', 'cart_id', 'category', 'currency', 'product_id']
    >>> b = w[100:200]
    >>> len(b), b.n_users, (b.ts == w.ts[100:200]).all()
    (100, 50, np.True_)
    >>> w.active_until.shape, b.active_until is w.active_until    # per user, kept by slices
    ((50,), True)
    """

    user: np.ndarray
    event_code: np.ndarray
    event_types: list[str]
    ts: np.ndarray
    num_props: dict[str, np.ndarray]
    str_codes: dict[str, np.ndarray]
    str_vocab: dict[str, np.ndarray]
    trait_user: np.ndarray
    traits: dict[str, np.ndarray]
    n_users: int
    start_ms: int
    end_ms: int
    active_until: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def event(self) -> np.ndarray:
        """Event type names as a numpy ``str`` array (built on each access; prefer
        ``event_code`` for large workloads)."""
        return np.array(self.event_types)[self.event_code]

    @functools.cached_property
    def props(self) -> Mapping[str, np.ndarray]:
        """Event properties, ``name -> column`` (NaN / ``None`` where absent).

        ``amount`` is float64; ``currency``, ``category``, ``product_id`` and ``cart_id`` are
        object arrays of ``str`` built on first access (8 bytes a row each: on a large
        workload, take them per batch).
        """
        return _Props(self.num_props, self.str_codes, self.str_vocab)

    @property
    def n_late(self) -> int:
        """Rows whose ``ts`` is lower than that of some earlier row (they arrived late)."""
        if len(self.ts) < 2:
            return 0
        return int((self.ts[1:] < np.maximum.accumulate(self.ts[:-1])).sum())

    def __getitem__(self, index: slice) -> "Workload":
        if not isinstance(index, slice):
            raise TypeError("a Workload is sliced by row ranges (w[i:j]); index the columns "
                            "for single rows")
        return dataclasses.replace(
            self,
            user=self.user[index], event_code=self.event_code[index], ts=self.ts[index],
            num_props={k: v[index] for k, v in self.num_props.items()},
            str_codes={k: v[index] for k, v in self.str_codes.items()},
        )

    def batches(self, size: int) -> Iterator["Workload"]:
        """Consecutive slices of at most ``size`` rows, in arrival order.

        >>> w = generate(n_users=20, n_events=100, seed=1)
        >>> sum(len(b) for b in w.batches(33)) == len(w)
        True
        """
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        for i in range(0, len(self), size):
            yield self[i:i + size]

    def __repr__(self) -> str:
        return (f"<Workload: {len(self)} events, {self.n_users} users, "
                f"{(self.end_ms - self.start_ms) / DAY_MS:g} days>")


def _zipf_weights(rng: np.random.Generator, n: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """``(p, rank)``: probabilities ``∝ 1 / (rank + 1)**s`` over a random permutation of ranks."""
    rank = rng.permutation(n)
    p = 1.0 / (rank + 1.0) ** s
    return p / p.sum(), rank


def _draw(rng: np.random.Generator, p: np.ndarray, size: int) -> np.ndarray:
    """``size`` iid category indices with probabilities ``p`` (inverse CDF)."""
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    r = rng.random(size)
    if len(p) <= 16:            # a few comparisons per row beat a binary search
        out = np.zeros(size, np.int32)
        for c in cdf[:-1]:
            out += r >= c
        return out
    return np.minimum(np.searchsorted(cdf, r, side="right"), len(p) - 1).astype(np.int32)


def generate(n_users: int = 2_000, n_events: int = 30_000, days: float = 120, seed: int = 0,
             zipf: float = 0.8, late_fraction: float = 0.01, max_late_ms: int = 60_000,
             start_ms: int = 1_700_000_000_000) -> Workload:
    """Generate a seeded synthetic shop workload (see the module docstring for the model).

    Parameters
    ----------
    n_users : int
        Number of users (ids ``0 .. n_users-1``); some heavy, most light, some silent.
    n_events : int
        Exact number of events.
    days : float
        Length of the period; every ``ts`` is in ``[start_ms, start_ms + days)``.
    seed : int
        Seed of the random generator; equal arguments give equal workloads.
    zipf : float
        Exponent of user activity: user weights ``∝ 1 / rank**zipf`` (0 = uniform).
    late_fraction : float
        Probability that an event arrives late.
    max_late_ms : int
        A late event arrives ``1 .. max_late_ms`` ms after its ``ts``.
    start_ms : int
        Start of the period, ms since the epoch.

    Returns
    -------
    Workload

    Examples
    --------
    Three months of a small shop, streamed in arrival order:

    >>> w = generate(n_users=300, n_events=5_000, days=90, seed=1, max_late_ms=3_600_000)
    >>> counts = dict(zip(w.event_types, np.bincount(w.event_code, minlength=9).tolist()))
    >>> counts["page_view"] > counts["product_view"] > counts["add_to_cart"] > counts["purchase"]
    True
    >>> 0 < w.n_late < 100             # ~1 % delayed by up to an hour
    True
    >>> bought = w.str_codes["cart_id"][w.event_code == EVENT_TYPES.index("purchase")]
    >>> carted = w.str_codes["cart_id"][w.event_code == EVENT_TYPES.index("add_to_cart")]
    >>> 0.3 < np.isin(carted, bought).mean() < 0.7    # the rest are abandoned
    np.True_
    >>> se = w.traits["country"] == "SE"
    >>> 0.03 < se.mean() < 0.15
    np.True_
    """
    if n_users < 1 or n_users > 1 << 32:
        raise ValueError(f"n_users must be in [1, 2**32], got {n_users}")
    if n_events < 0:
        raise ValueError(f"n_events must be >= 0, got {n_events}")
    span_ms = int(round(days * DAY_MS))
    if span_ms < 2 * HOUR_MS:
        raise ValueError(f"days must cover at least 2 hours, got {days}")
    if not 0.0 <= late_fraction <= 1.0:
        raise ValueError(f"late_fraction must be in [0, 1], got {late_fraction}")
    if max_late_ms < 0:
        raise ValueError(f"max_late_ms must be >= 0, got {max_late_ms}")
    if zipf < 0:
        raise ValueError(f"zipf must be >= 0, got {zipf}")
    rng = np.random.default_rng(seed)
    end_ms = start_ms + span_ms
    n_u, n = int(n_users), int(n_events)
    f32 = np.float32

    # ---- users: activity, lifetime, habits, traits
    p_user, rank = _zipf_weights(rng, n_u, zipf)
    existing = (rank < max(1, n_u // 100)) | (rng.random(n_u) < 0.4)
    del rank
    # All of a user's events fall in [first, last); sessions start before last - 1h.
    head_ms = min(DAY_MS, span_ms - HOUR_MS)
    first = start_ms + (rng.random(n_u) * np.where(existing, head_ms, span_ms - HOUR_MS)
                        ).astype(np.int64)
    life = (rng.standard_exponential(n_u) * (90 * DAY_MS)).astype(np.int64)
    last = np.clip(first + life, first + HOUR_MS, end_ms)
    del existing, life
    clicker = rng.random(n_u, dtype=f32) < 0.5
    app_user = rng.random(n_u, dtype=f32) < 0.35
    country = _draw(rng, _COUNTRY_SHARE, n_u)
    favourite = _draw(rng, _CATEGORY_SHARE, n_u)

    # ---- events per user (exactly n), grouped by user until the final sort
    counts = rng.multinomial(n, p_user)
    del p_user
    user = np.repeat(np.arange(n_u, dtype=np.uint32), counts)

    # ---- sessions of ~5 events within an hour; a user's first session starts at `first`
    n_sess = np.zeros(n_u, np.int64)
    active = counts > 0
    n_sess[active] = 1 + rng.binomial(counts[active] - 1, 0.2)
    del counts
    sess_off = np.cumsum(n_sess) - n_sess
    sess_user = np.repeat(np.arange(n_u), n_sess)
    lo = first[sess_user]
    sess_start = lo + (rng.random(len(sess_user)) * (last[sess_user] - HOUR_MS - lo)
                       ).astype(np.int64)
    sess_start[sess_off[active]] = first[active]
    active_until = last          # kept for the Workload (never modified in place)
    del sess_user, lo, first, last, active
    ns = n_sess[user]
    sess = (rng.random(n, dtype=f32) * ns).astype(np.int64)
    ns -= 1
    np.minimum(sess, ns, out=sess)                      # float32 rounding can reach n_sess
    del ns
    sess += sess_off[user]
    ts = sess_start[sess]
    del sess, sess_start, sess_off, n_sess
    offset = rng.standard_exponential(n, dtype=f32)
    offset *= 3 * MINUTE_MS
    ts += np.minimum(offset, HOUR_MS - 1).astype(np.int64)
    del offset

    # ---- event types, then per-user habits
    code = _draw(rng, _EVENT_SHARE, n)
    code[(code == _EMAIL_CLICK) & ~clicker[user]] = _EMAIL_OPEN
    code[(code == _APP_OPEN) & ~app_user[user]] = _PAGE_VIEW
    del clicker, app_user

    # ---- carts and purchases: pair purchases with distinct carts, bought after a delay
    carts = np.flatnonzero(code == _ADD_TO_CART)
    buys = np.flatnonzero(code == _PURCHASE)
    cart_code = np.full(n, -1, np.int32)
    cart_code[carts] = np.arange(len(carts), dtype=np.int32)
    k = min(len(buys), int(0.6 * len(carts)))
    paired_cart = carts[rng.choice(len(carts), k, replace=False)] if k else carts[:0]
    paired_buy = buys[rng.permutation(len(buys))[:k]]
    buy_ts = ts[paired_cart] + 5_000 + (rng.standard_exponential(k) * (20 * MINUTE_MS)
                                        ).astype(np.int64)
    ok = buy_ts < end_ms
    paired_cart, paired_buy = paired_cart[ok], paired_buy[ok]
    user[paired_buy] = user[paired_cart]
    ts[paired_buy] = buy_ts[ok]
    cart_code[paired_buy] = cart_code[paired_cart]
    direct = np.setdiff1d(buys, paired_buy, assume_unique=True)
    cart_code[direct] = len(carts) + np.arange(len(direct), dtype=np.int32)
    n_carts = len(carts) + len(direct)
    del carts, buys, paired_cart, paired_buy, buy_ts, ok, direct

    # ---- arrival order. Sort one int64 key (arrival << b | row): unique keys make the order
    # independent of the sort algorithm (ties keep generation order), and a plain sort of
    # int64 is several times faster than argsort.
    late = np.zeros(0, np.int64)
    key = ts - start_ms
    if late_fraction > 0 and max_late_ms > 0 and n:
        late = np.flatnonzero(rng.random(n, dtype=f32) < late_fraction)
        key[late] += rng.integers(1, max_late_ms, len(late), endpoint=True)
    b = max(1, (n - 1).bit_length())
    if (span_ms + max_late_ms) >> (63 - b) == 0:
        key <<= b
        key |= np.arange(n)
        key.sort()
        order = key & ((1 << b) - 1)
        arrival = key >> b
        del key
        # only late rows have ts != arrival
        arrival += start_ms
        ts_sorted = arrival
        if len(late):
            is_late = np.zeros(n, bool)
            is_late[late] = True
            pos = np.flatnonzero(is_late[order])
            ts_sorted[pos] = ts[order[pos]]
            del is_late, pos
    else:   # pragma: no cover - periods of centuries
        order = np.argsort(key, kind="stable")
        del key
        ts_sorted = ts[order]
    del ts, late
    # one random gather for user and type together; sparse gathers for the rest
    word = user.astype(np.int64)
    del user
    word |= code.astype(np.int64) << 32
    del code
    word = word[order]
    user = (word & 0xFFFF_FFFF).astype(np.uint32)
    code = (word >> 32).astype(np.int32)
    del word

    def sparse(col: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.full(n, -1, np.int32)
        out[rows] = col[order[rows]]
        return out

    cart_rows = np.flatnonzero((code == _ADD_TO_CART) | (code == _PURCHASE))
    cart_sorted = sparse(cart_code, cart_rows)
    del cart_code, cart_rows, order

    # ---- properties drawn in arrival order (they depend only on the row's type and user)
    # products: popularity Zipf(1), each of one category; half of a user's product views and
    # carts are in their favourite category
    prod_cat = _draw(rng, _CATEGORY_SHARE, _N_PRODUCTS)
    prod_p, _ = _zipf_weights(rng, _N_PRODUCTS, 1.0)
    by_cat = np.argsort(prod_cat, kind="stable")
    cat_n = np.bincount(prod_cat, minlength=len(_CATEGORIES))
    cat_off = np.cumsum(cat_n) - cat_n
    rows = np.flatnonzero((code == _PRODUCT_VIEW) | (code == _ADD_TO_CART))
    fav = favourite[user[rows]]
    use_fav = (rng.random(len(rows), dtype=f32) < 0.5) & (cat_n[fav] > 0)
    product = np.empty(len(rows), np.int32)
    product[~use_fav] = _draw(rng, prod_p, int((~use_fav).sum()))
    fav = fav[use_fav]
    pick = np.minimum((rng.random(len(fav)) * cat_n[fav]).astype(np.int64), cat_n[fav] - 1)
    product[use_fav] = by_cat[cat_off[fav] + pick]
    del fav, use_fav, pick
    product_code = np.full(n, -1, np.int32)
    product_code[rows] = product
    category_code = np.full(n, -1, np.int32)
    views = rows[code[rows] == _PRODUCT_VIEW]
    category_code[views] = prod_cat[product_code[views]]
    del rows, product, views

    # purchases: currency of the user's country, amount ~ lognormal (about 55 EUR median)
    currency_of_country = np.zeros(len(_COUNTRIES), np.int32)          # EUR
    currency_of_country[_COUNTRIES.index("SE")] = _CURRENCIES.index("SEK")
    currency_of_country[_COUNTRIES.index("US")] = _CURRENCIES.index("USD")
    buys = np.flatnonzero(code == _PURCHASE)
    cur = currency_of_country[country[user[buys]]]
    currency_code = np.full(n, -1, np.int32)
    currency_code[buys] = cur
    amount = np.full(n, np.nan)
    amount[buys] = np.round(rng.lognormal(4.0, 0.9, len(buys)) * _CURRENCY_RATE[cur], 2)
    del buys, cur

    return Workload(
        user=user,
        event_code=code,
        event_types=list(EVENT_TYPES),
        ts=ts_sorted,
        num_props={"amount": amount},
        str_codes={"currency": currency_code, "category": category_code,
                   "product_id": product_code, "cart_id": cart_sorted},
        str_vocab={
            "currency": np.array(_CURRENCIES, dtype=object),
            "category": np.array(_CATEGORIES, dtype=object),
            "product_id": np.array([f"p{i:04d}" for i in range(_N_PRODUCTS)], dtype=object),
            "cart_id": np.array([f"c{i}" for i in range(n_carts)], dtype=object),
        },
        trait_user=np.arange(n_u, dtype=np.uint32),
        traits={"country": np.array(_COUNTRIES)[country]},
        n_users=n_u,
        start_ms=start_ms,
        end_ms=end_ms,
        active_until=active_until,
    )


def recompute(w: Workload, now_ms: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Recompute :data:`DEFAULT_SEGMENTS` from scratch with numpy: the members of each segment
    at ``now_ms`` given every event of ``w`` (all of which must have ``ts <= now_ms``).

    This is the batch answer a segment recompute job would give (only the end state, no
    transitions); segcore's benchmarks compare a whole incremental pass against it, and the
    tests use it as an independent exact oracle. Users are ``0 .. n_users-1`` with the
    workload's traits (so every user exists, as after ``set_traits_many``).

    >>> w = generate(n_users=300, n_events=3_000, seed=2)
    >>> end = recompute(w, int(w.ts.max()))
    >>> sorted(end) == sorted(DEFAULT_SEGMENTS)
    True
    """
    if len(w) and int(w.ts.max()) > now_ms:
        raise ValueError("recompute needs every event at or before now_ms")
    n = w.n_users
    u = w.user.astype(np.int64)
    code = w.event_code
    ts = w.ts

    def count(ev: int, window_ms: int | None = None, extra=None) -> np.ndarray:
        m = code == ev
        if window_ms is not None:
            m &= ts > now_ms - window_ms
        if extra is not None:
            m &= extra
        return np.bincount(u[m], minlength=n)

    def latest(ev: int | None) -> np.ndarray:
        out = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
        m = slice(None) if ev is None else code == ev
        np.maximum.at(out, u[m], ts[m])
        return out

    cat = w.str_codes["category"]
    shoes = int(np.flatnonzero(w.str_vocab["category"] == "shoes")[0]) \
        if "shoes" in set(w.str_vocab["category"].tolist()) else -2
    amount = w.num_props["amount"]
    buy = (code == _PURCHASE) & ~np.isnan(amount)
    ltv = np.bincount(u[buy], weights=amount[buy], minlength=n)
    seen = np.bincount(u, minlength=n) > 0
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, u, ts)
    last_any = latest(None)
    last_a, last_b = latest(_ADD_TO_CART), latest(_PURCHASE)
    frequent = count(_PURCHASE, 90 * DAY_MS) >= 3
    country = w.traits["country"]
    se = np.zeros(n, dtype=bool)
    se[w.trait_user.astype(np.int64)] = country == "SE"
    from .hashing import buckets_of_ints
    out = {
        "frequent_buyers": frequent,
        "high_ltv": ltv >= 500,
        "high_intent_browsers": (count(_PRODUCT_VIEW, 7 * DAY_MS, cat == shoes) >= 3)
        & (count(_PURCHASE, 30 * DAY_MS) == 0),
        "engaged_app_users": count(_APP_OPEN, 7 * DAY_MS) >= 5,
        "recent_support_contact": count(_SUPPORT_TICKET, 3 * DAY_MS) >= 1,
        "inactive_30d": seen & (last_any <= now_ms - 30 * DAY_MS),
        "opens_never_clicks": (count(_EMAIL_OPEN, 30 * DAY_MS) >= 3)
        & (count(_EMAIL_CLICK, 30 * DAY_MS) == 0),
        "cart_abandoners": (last_a != np.iinfo(np.int64).min) & (last_b < last_a)
        & (last_a <= now_ms - HOUR_MS),
        "buying_intent": count(_PRODUCT_VIEW, DAY_MS) >= 5,
        "new_users": seen & (first >= now_ms - 7 * DAY_MS),
        "swedish_frequent_buyers": se & frequent,
        "holdout_10pct": buckets_of_ints(np.arange(n, dtype=np.int64), seed) <= 999,
    }
    return {name: np.flatnonzero(mask).astype(np.uint32) for name, mask in out.items()}
