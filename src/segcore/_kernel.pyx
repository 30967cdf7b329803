# distutils: language = c++
"""segcore's private compiled kernel.

It knows nothing about rule text, names, JSON or callbacks: it receives a flat plan (arrays of
feature, atom, term and program descriptors built by ``compile.py``) and events as integer and
float columns, keeps every user's hot state in flat typed arrays, and appends
``(user, segment, entered, ts)`` transitions to a buffer that ``engine.py`` drains.

Invariants (see docs/semantics.md):

* ``now`` never decreases; every evaluation happens at a time >= every earlier evaluation.
* A user's counter row is ``istride`` int64 values. In a compact kernel (``Kernel(plan,
  compact=True)``) whose plan has no predictive scores (their day ring packs 16-bit counters
  into int64 words), rows are stored packed, 6 bytes a value (see ``_row``; the low 32 bits
  of every code, then the high 16): the code 0 is the slot's initial value (its "none"
  sentinel, or a count's 0) and any other code is the value plus 1, so every timestamp below
  2**48 - 1 and every count below 2**48 - 1 fits. A value that does not fit (the last
  millisecond ts = 2**48 - 1, or a snapshot's) turns the table to int64 rows for good
  (``_widen``) before it is stored.
* ``wake[u]`` is the next instant > last evaluation of ``u`` at which any time-dependent input
  of ``u`` can change (a windowed event expiring, an abandoned cart maturing, an age test
  flipping), or INT64_MAX. The heap holds ``(wake, u)`` pairs; entries whose time differs from
  ``wake[u]`` are stale and skipped. So ``advance`` touches exactly the users with something
  due, never all users.
"""

cimport cython
from libc.stdint cimport (int64_t, int32_t, int8_t, uint32_t, uint64_t, uint8_t, INT64_MAX,
                          INT64_MIN)
from libc.math cimport isnan, NAN, INFINITY, exp, log, log1p, expm1, fabs
from libc.string cimport memcpy, memset
from libcpp.vector cimport vector
cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1
from libcpp.pair cimport pair
from libcpp.algorithm cimport push_heap, pop_heap, make_heap, sort

import numpy as np

# feature kinds (mirrored in compile.py)

# atom kinds

# comparison ops

# value terms (postfix)

# feature value functions

# program ops


cdef enum:
    K_TOPK = 1
    K_COUNT = 2
    K_STATS = 3
    K_FIRST = 4
    K_LAST = 5
    K_WLIST = 6
    K_DISTINCT = 7
    K_ABANDON = 8
    K_ABANDON_BY = 9
    K_SUM = 10
    K_MODE = 11
    K_SEQ = 12
    K_SESS = 13
    K_PRED = 14
    A_CONST = 0
    A_COUNTK = 1
    A_NUM = 2
    A_TIME = 3
    A_TRAIT = 4
    A_BUCKET = 5
    A_IN = 6
    A_ABANDON = 7
    A_MODE = 8
    A_SEQ = 9
    A_PRED = 10
    OP_EQ = 0
    OP_NE = 1
    OP_LT = 2
    OP_LE = 3
    OP_GT = 4
    OP_GE = 5
    OP_EXISTS = 6
    T_CONST = 0
    T_FEAT = 1
    T_SCORE = 2
    T_ADD = 3
    T_SUB = 4
    T_DIV = 5
    FN_COUNT = 0
    FN_SUM = 1
    FN_AVG = 2
    FN_MIN = 3
    FN_MAX = 4
    FN_DISTINCT = 5
    FN_TS = 6
    FN_EV = 8          # session aggregates: FN_SUM + FN_EV ... over `events` (else duration)
    FN_LAST_DUR = 13
    FN_LAST_EV = 14
    MAX_STEPS = 16
    P_ATOM = 0
    P_AND = 1
    P_OR = 2
    P_NOT = 3
    STACK = 64
    # built-in predictive scores (compile.S_*), their state and parameters (docs/predictive.md)
    S_P_ALIVE = 0
    S_CHURN = 1
    S_EXPECTED = 2
    S_LTV = 3
    S_CONVERT = 4
    RING_DAYS = 16
    N_PP = 32           # r, alpha, a, b | p, q, v | horizon (days) | logistic coefficients
    PP_COEF = 8
    MAX_SERIES = 100000
    # the timer wheel: buckets of 2**WHEEL_BITS ms (~70 min), WHEEL_N of them (~199 days)
    WHEEL_BITS = 22
    WHEEL_N = 4096


cdef int64_t DAY_MS = 86400000
#: dense user indices an IdMap can hold (its slots keep the index plus 2 in 32 bits)
cdef int64_t ID_LIMIT = (<int64_t>1 << 32) - 2
#: the largest value a packed counter slot holds besides its initial value
cdef int64_t PACK_MAX = (<int64_t>1 << 48) - 2
#: how far ahead one search for a score's crossing looks (~2230 years); past it, re-check then
cdef int64_t PRED_REACH = (<int64_t>1) << 46


cdef inline int64_t floordiv(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t q = a // b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef struct Entry:
    int64_t ts
    double val
    int64_t key
    int64_t aux

ctypedef pair[int64_t, int64_t] HeapItem

cdef extern from *:
    """
    #define SEGCORE_PREFETCH(p) __builtin_prefetch((const void*)(p), 1, 1)
    #define SEGCORE_LIKELY(x) __builtin_expect(!!(x), 1)
    """
    void SEGCORE_PREFETCH(const void* p) nogil
    bint SEGCORE_LIKELY(bint x) nogil

cdef extern from *:
    """
    /* A packed counter row of n values: the low 32 bits of every code, then the high 16
       (the planes keep both loops free of overlapping stores, so they vectorise). */
    static __attribute__((noinline)) void segcore_unpack(const uint8_t* p, int64_t* __restrict out,
                                      const int64_t* __restrict init, int64_t n) {
        const uint32_t* lo = (const uint32_t*)p;
        const uint16_t* hi = (const uint16_t*)(p + 4 * n);
        for (int64_t j = 0; j < n; j++) {
            uint64_t x = ((uint64_t)hi[j] << 32) | lo[j];
            out[j] = x == 0 ? init[j] : (int64_t)x - 1;
        }
    }
    static __attribute__((noinline)) void segcore_pack(const int64_t* __restrict v, uint8_t* p,
                                    const int64_t* __restrict init, int64_t n) {
        uint32_t* lo = (uint32_t*)p;
        uint16_t* hi = (uint16_t*)(p + 4 * n);
        for (int64_t j = 0; j < n; j++) {
            uint64_t x = v[j] == init[j] ? 0 : (uint64_t)(v[j] + 1);
            lo[j] = (uint32_t)x;
            hi[j] = (uint16_t)(x >> 32);
        }
    }
    """
    void segcore_unpack(const uint8_t* p, int64_t* out, const int64_t* init, int64_t n) nogil
    void segcore_pack(const int64_t* v, uint8_t* p, const int64_t* init, int64_t n) nogil

#: How many events ahead track() prefetches a user's state (hides DRAM latency at 1M users).
cdef enum:
    DEF_PREFETCH = 8


ctypedef fused num_t:
    double
    int64_t


cdef inline bint cmp_v(int op, num_t a, num_t b) noexcept nogil:
    if op == OP_EQ:
        return a == b
    if op == OP_NE:
        return a != b
    if op == OP_LT:
        return a < b
    if op == OP_LE:
        return a <= b
    if op == OP_GT:
        return a > b
    if op == OP_GE:
        return a >= b
    return False


cdef inline bint entry_key_less(const Entry& a, const Entry& b) noexcept nogil:
    return a.key < b.key


cdef inline void insert_by_ts(vector[Entry]* vec, const Entry& ent) noexcept nogil:
    """Insert keeping (ts, arrival) order: after the entries with an equal ts."""
    cdef size_t n = vec.size()
    while n > 0 and vec[0][n - 1].ts > ent.ts:
        n -= 1
    vec.insert(vec.begin() + n, ent)


cdef inline size_t key_lower_bound(vector[Entry]* vec, int64_t key) noexcept nogil:
    """The first position whose key is >= key, in a vector sorted by key."""
    cdef size_t lo = 0, hi = vec.size(), mid
    while lo < hi:
        mid = (lo + hi) // 2
        if vec[0][mid].key < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline bint entry_ts_less(const Entry& a, const Entry& b) noexcept nogil:
    return a.ts < b.ts


cdef inline bint entry_key_val_less(const Entry& a, const Entry& b) noexcept nogil:
    return a.key < b.key or (a.key == b.key and a.val < b.val)


cdef inline bint entry_key_ts_less(const Entry& a, const Entry& b) noexcept nogil:
    if a.key != b.key:
        return a.key < b.key
    if a.ts != b.ts:
        return a.ts < b.ts
    return a.val < b.val


def _i32(x):
    return np.ascontiguousarray(x, dtype=np.int32)


def _i64(x):
    return np.ascontiguousarray(x, dtype=np.int64)


def _f64(x):
    return np.ascontiguousarray(x, dtype=np.float64)


@cython.final
cdef class Kernel:
    """Per-user hot state, the timer heap and the evaluator for one compiled plan."""

    # ---- plan
    cdef readonly int n_feat, n_seg, n_atom, n_codes, istride, fstride, n_var
    cdef readonly int n_trait, n_score, n_filter, n_val, n_key
    cdef int32_t[::1] f_kind, f_event, f_event2, f_filter, f_val, f_key, f_k, f_ioff, f_foff
    cdef int32_t[::1] f_var, f_fn
    cdef int64_t[::1] f_window, f_span
    cdef int32_t[::1] sq_start, sq_event, sq_filter, sq_neg
    cdef readonly int64_t seq_cap, seq_evicted
    cdef readonly int pred_f, pr_buy, n_conv, n_patom, pr_spd
    cdef int32_t[::1] pr_conv, pred_atoms
    cdef double pp[N_PP]
    cdef object _pcache
    cdef int64_t* pcache        # per user and predictive atom: its next crossing, or INT64_MIN
    # the last _seq_eval (user, feature, instant) -> (result, next change); reset on change
    cdef bint sc_valid, sc_res
    cdef uint32_t sc_u
    cdef int sc_f
    cdef int64_t sc_t, sc_nxt
    cdef int32_t[::1] lst_start, lst_feat, any_feat
    cdef int32_t[::1] time_feats
    # per event code (row n_codes: codes no rule names), the time-dependent features it updates
    # and the age atoms reading them: the only wake-up candidates an event can move
    cdef int32_t[::1] wf_start, wf_list, wa_start, wa_list
    # per entry of es_list: which of its event code's listeners (bit min(i, 63) for the i-th,
    # as _apply numbers them) the segment reads, itself or through in(): an event whose
    # listeners changed none of them leaves the segment as it was
    cdef uint64_t[::1] es_mask
    # per time feature and per age atom (by position), the segments a change of it can flip
    # (with the segments referring to those); pred_segs: those reading a predictive score
    cdef int32_t[::1] tf_start, tf_segs, ta_start, ta_segs, pred_segs
    cdef vector[uint8_t] tmark
    # per windowed count (K_TOPK) feature, the counts c whose drop to c - 1 flips one of the
    # `count(...) op k` atoms reading it (nothing else may: _check_plan), largest first
    # (crit_start: CSR): only those drops are wake-up instants
    cdef int32_t[::1] crit_start, crit_list
    # one event's property row (filters passed, numbers, keys): _track_fast fills it through
    # the pointers, Engine._track_general through the arrays, and both pass it to _one
    cdef readonly object row_f, row_v, row_k
    cdef uint8_t* one_f
    cdef double* one_v
    cdef int64_t* one_k
    cdef vector[int32_t] tsegs
    cdef int32_t[::1] a_kind, a_op, a_f, a_t0, a_t1, a_t2, a_t3, a_s
    cdef double[::1] a_k
    cdef int64_t[::1] a_c
    cdef int32_t[::1] time_atoms
    cdef int32_t[::1] t_kind, t_a, t_b
    cdef double[::1] t_v
    cdef int32_t[::1] p_start, p_op, p_arg
    cdef int32_t[::1] es_start, es_list, time_segs, all_segs
    # timed items: triggers (kind 0) and journeys (kind 1), in registration order
    cdef readonly int n_items
    cdef int32_t[::1] it_kind, it_seg, it_enter, it_sstart, it_send, it_xstart, it_xend
    cdef int64_t[::1] it_delay, st_delay
    cdef int32_t[::1] st_onlyif, ex_seg
    cdef int8_t[::1] flipdir
    cdef vector[int32_t] flipped
    cdef int64_t[::1] irow_init
    cdef double[::1] frow_init
    # ---- state
    cdef readonly int64_t n_users, cap, now
    cdef readonly int64_t n_fired, n_evals      # timers fired, segment evaluations
    cdef object _istate, _fstate, _members, _tbits, _scores, _bucket, _wake
    cdef int64_t* istate        # int64 rows (NULL while packed)
    # packed rows (docs at the top): prow bytes a user; rc is user rc_u's row decoded, the
    # only copy of it that is current until _row moves to another user or _flush
    cdef readonly bint packed
    cdef uint8_t* pstate
    cdef int64_t prow, rc_u
    cdef vector[int64_t] rc
    cdef const int64_t* iinit
    cdef double* fstate
    cdef uint8_t* members       # membership flags, one bit per segment, mstride bytes a user
    cdef readonly int mstride
    cdef uint8_t* tbits
    cdef double* scores
    cdef int32_t* bucket
    cdef int64_t* wake
    cdef uint8_t* fresh
    cdef object _fresh
    cdef object _dead, _jpos
    cdef int64_t* dead          # per user and item: instant of the pending firing or INT64_MAX
    cdef int32_t* jpos          # per user and journey: index of the pending step, -1 = not in
    cdef vector[int32_t] fi_item, fi_step
    cdef vector[uint32_t] fi_u
    cdef vector[int64_t] fi_t
    cdef vector[uint8_t] fi_flag
    cdef vector[vector[Entry]] pools
    # Timers: ``heap`` (binary, earliest first) holds every entry due before ``horizon``;
    # later ones wait unsorted in the wheel bucket of their 70-minute slot, or, past the
    # wheel's reach, in the ``over`` heap. Moving the horizon over a bucket heaps its
    # entries, so pushes are O(1) and pops sift a heap of about one bucket.
    cdef vector[HeapItem] heap
    cdef vector[vector[HeapItem]] wheel
    cdef vector[HeapItem] over
    cdef int64_t horizon
    cdef size_t n_wheel
    cdef vector[uint32_t] tr_u
    cdef vector[int32_t] tr_s
    cdef vector[uint8_t] tr_e
    cdef vector[int64_t] tr_t
    cdef vector[Entry] scratch

    def __init__(self, dict plan, bint compact=False):
        """A kernel for one compiled plan; ``compact`` stores the counter rows packed (6
        bytes a value instead of 8, ``Engine(compact_rows=True)``) unless the plan has
        predictive scores."""
        self.f_kind = _i32(plan["f_kind"])
        self.n_feat = self.f_kind.shape[0]
        self.f_event = _i32(plan["f_event"])
        self.f_event2 = _i32(plan["f_event2"])
        self.f_filter = _i32(plan["f_filter"])
        self.f_val = _i32(plan["f_val"])
        self.f_key = _i32(plan["f_key"])
        self.f_k = _i32(plan["f_k"])
        self.f_ioff = _i32(plan["f_ioff"])
        self.f_foff = _i32(plan["f_foff"])
        self.f_var = _i32(plan["f_var"])
        self.f_window = _i64(plan["f_window"])
        self.f_span = _i64(plan.get("f_span", np.zeros(self.n_feat, np.int64)))
        self.sq_start = _i32(plan.get("sq_start", np.zeros(self.n_feat + 1, np.int32)))
        self.sq_event = _i32(plan.get("sq_event", []))
        self.sq_filter = _i32(plan.get("sq_filter", []))
        self.sq_neg = _i32(plan.get("sq_neg", []))
        self.seq_cap = int(plan.get("seq_cap", 1024))
        self.seq_evicted = 0
        self.pred_f = int(plan.get("pred_f", -1))
        self.pr_buy = int(plan.get("pr_buy", -1))
        self.pr_conv = _i32(plan.get("pr_conv", []))
        self.n_conv = self.pr_conv.shape[0]
        self.pr_spd = (self.n_conv + 4) // 4
        self.pred_atoms = _i32(plan.get("pred_atoms", []))
        self.n_patom = self.pred_atoms.shape[0]
        for i in range(N_PP):
            self.pp[i] = NAN
        self.lst_start = _i32(plan["lst_start"])
        self.lst_feat = _i32(plan["lst_feat"])
        self.any_feat = _i32(plan["any_feat"])
        self.time_feats = _i32(plan["time_feats"])
        self.n_codes = self.lst_start.shape[0] - 1
        self.a_kind = _i32(plan["a_kind"])
        self.n_atom = self.a_kind.shape[0]
        self.a_op = _i32(plan["a_op"])
        self.a_f = _i32(plan["a_f"])
        self.a_t0 = _i32(plan["a_t0"])
        self.a_t1 = _i32(plan["a_t1"])
        self.a_t2 = _i32(plan["a_t2"])
        self.a_t3 = _i32(plan["a_t3"])
        self.a_s = _i32(plan["a_s"])
        self.a_k = _f64(plan["a_k"])
        self.a_c = _i64(plan["a_c"])
        self.time_atoms = _i32(plan["time_atoms"])
        self.t_kind = _i32(plan["t_kind"])
        self.t_a = _i32(plan["t_a"])
        self.t_b = _i32(plan["t_b"])
        self.t_v = _f64(plan["t_v"])
        self.p_start = _i32(plan["p_start"])
        self.n_seg = self.p_start.shape[0] - 1
        self.p_op = _i32(plan["p_op"])
        self.p_arg = _i32(plan["p_arg"])
        self.es_start = _i32(plan["es_start"])
        self.es_list = _i32(plan["es_list"])
        self.time_segs = _i32(plan["time_segs"])
        self.all_segs = np.arange(max(self.n_seg, 1), dtype=np.int32)
        self.it_kind = _i32(plan.get("it_kind", []))
        self.n_items = self.it_kind.shape[0]
        self.it_seg = _i32(plan.get("it_seg", []))
        self.it_enter = _i32(plan.get("it_enter", []))
        self.it_delay = _i64(plan.get("it_delay", []))
        self.it_sstart = _i32(plan.get("it_sstart", []))
        self.it_send = _i32(plan.get("it_send", []))
        self.it_xstart = _i32(plan.get("it_xstart", []))
        self.it_xend = _i32(plan.get("it_xend", []))
        self.st_delay = _i64(plan.get("st_delay", []))
        self.st_onlyif = _i32(plan.get("st_onlyif", []))
        self.ex_seg = _i32(plan.get("ex_seg", []))
        self.flipdir = np.zeros(max(self.n_seg, 1), dtype=np.int8)
        self.istride = int(plan["istride"])
        self.fstride = int(plan["fstride"])
        self.n_var = int(plan["n_var"])
        self.n_trait = int(plan["n_trait"])
        self.n_score = int(plan["n_score"])
        self.n_filter = int(plan["n_filter"])
        self.n_val = int(plan["n_val"])
        self.n_key = int(plan["n_key"])
        self.mstride = (max(self.n_seg, 1) + 7) // 8
        self.irow_init = _i64(plan["irow_init"])
        self.frow_init = _f64(plan["frow_init"])
        self._check_plan()
        self.iinit = &self.irow_init[0] if self.istride else NULL
        self.packed = compact and self.pred_f < 0 and self.istride > 0
        self.prow = (6 * self.istride + 3) // 4 * 4   # (4-aligned: the low plane is uint32)
        self.rc_u = -1
        self.rc.resize(max(self.istride, 1))
        self._wake_index()
        self.wheel.resize(WHEEL_N)
        self.row_f = np.zeros(max(self.n_filter, 1), dtype=np.uint8)
        self.row_v = np.full(max(self.n_val, 1), np.nan, dtype=np.float64)
        self.row_k = np.full(max(self.n_key, 1), -1, dtype=np.int64)
        cdef uint8_t[::1] mrf = self.row_f
        cdef double[::1] mrv = self.row_v
        cdef int64_t[::1] mrk = self.row_k
        self.one_f, self.one_v, self.one_k = &mrf[0], &mrv[0], &mrk[0]
        self.n_users = 0
        self.cap = 0
        self.now = 0
        self._alloc(16)

    cdef void _check_plan(self) except *:
        # The plan comes from compile.py, but a bad plan must raise, never corrupt memory.
        cdef int f, a, i, p
        if self.irow_init.shape[0] != self.istride or self.frow_init.shape[0] != self.fstride:
            raise ValueError("plan: row template sizes do not match strides")
        for name in ("f_event", "f_event2", "f_filter", "f_val", "f_key", "f_k", "f_ioff",
                     "f_foff", "f_var", "f_window", "f_span"):
            if getattr(self, "_len_" + name)() != self.n_feat:
                raise ValueError(f"plan: {name} has the wrong length")
        for f in range(self.n_feat):
            if not (0 <= self.f_ioff[f] and self.f_ioff[f] + self._isize(f) <= self.istride):
                raise ValueError("plan: feature int offset out of range")
            if not (0 <= self.f_foff[f] and self.f_foff[f] + self._fsize(f) <= self.fstride):
                raise ValueError("plan: feature float offset out of range")
            if self.f_filter[f] >= self.n_filter or self.f_val[f] >= self.n_val \
                    or self.f_key[f] >= self.n_key or self.f_var[f] >= self.n_var:
                raise ValueError("plan: feature column out of range")
            if self.f_kind[f] in (K_WLIST, K_DISTINCT, K_ABANDON_BY, K_MODE, K_SEQ, K_SESS) \
                    and self.f_var[f] < 0:
                raise ValueError("plan: variable feature without a pool")
            if self.f_kind[f] in (K_ABANDON_BY, K_MODE) and self.f_key[f] < 0:
                raise ValueError("plan: keyed feature without a key column")
            if self.f_kind[f] < K_TOPK or self.f_kind[f] > K_PRED:
                raise ValueError("plan: unknown feature kind")
            if not 0 <= self.f_window[f] < (<int64_t>1 << 48) or \
                    not 0 <= self.f_span[f] < (<int64_t>1 << 48):
                raise ValueError("plan: window out of range")
            if self.f_kind[f] == K_SESS and self.f_span[f] <= 0:
                raise ValueError("plan: sessions need a timeout")
            if not 0 <= self.sq_start[f] <= self.sq_start[f + 1] <= self.sq_event.shape[0]:
                raise ValueError("plan: seq steps out of range")
            if self.f_kind[f] == K_SEQ:
                m = self.sq_start[f + 1] - self.sq_start[f]
                if not 2 <= m <= MAX_STEPS:
                    raise ValueError("plan: bad seq step count")
                for i in range(self.sq_start[f], self.sq_start[f + 1]):
                    if self.sq_neg[i] and (m != 2 or i != self.sq_start[f] + 1 or
                                           self.f_span[f] <= 0):
                        raise ValueError("plan: bad negated seq step")
        if self.sq_start.shape[0] != self.n_feat + 1 or \
                self.sq_filter.shape[0] != self.sq_event.shape[0] or \
                self.sq_neg.shape[0] != self.sq_event.shape[0]:
            raise ValueError("plan: seq arrays have the wrong length")
        for i in range(self.sq_event.shape[0]):
            if not -1 <= self.sq_filter[i] < self.n_filter:
                raise ValueError("plan: seq filter out of range")
        if self.seq_cap < 1:
            raise ValueError("plan: seq_cap must be >= 1")
        for i in range(self.lst_feat.shape[0]):
            if not 0 <= self.lst_feat[i] < self.n_feat:
                raise ValueError("plan: listener out of range")
        for i in range(self.any_feat.shape[0]):
            if not 0 <= self.any_feat[i] < self.n_feat:
                raise ValueError("plan: listener out of range")
        for i in range(self.n_codes):
            if not 0 <= self.lst_start[i] <= self.lst_start[i + 1] <= self.lst_feat.shape[0]:
                raise ValueError("plan: listener index out of range")
        for i in range(self.time_feats.shape[0]):
            if not 0 <= self.time_feats[i] < self.n_feat:
                raise ValueError("plan: time feature out of range")
        for name in ("a_op", "a_f", "a_t0", "a_t1", "a_t2", "a_t3", "a_s", "a_k", "a_c"):
            if getattr(self, "_len_" + name)() != self.n_atom:
                raise ValueError(f"plan: {name} has the wrong length")
        cdef int nt = self.t_kind.shape[0]
        if self.t_a.shape[0] != nt or self.t_b.shape[0] != nt or self.t_v.shape[0] != nt:
            raise ValueError("plan: term arrays differ in length")
        for i in range(nt):
            if self.t_kind[i] == T_FEAT and not 0 <= self.t_a[i] < self.n_feat:
                raise ValueError("plan: term feature out of range")
            if self.t_kind[i] == T_FEAT and self.f_kind[self.t_a[i]] == K_TOPK:
                # (its wake-ups are only the drops its count atoms see: _crit_index)
                raise ValueError("plan: a windowed count read as a value")
            if self.t_kind[i] == T_SCORE and not 0 <= self.t_a[i] < self.n_score:
                raise ValueError("plan: term score out of range")
        if self.pred_f >= 0 and not (self.pred_f < self.n_feat and
                                     self.f_kind[self.pred_f] == K_PRED):
            raise ValueError("plan: pred_f is not a predictive feature")
        if self.n_conv > 8 or (self.pred_f < 0 and (self.n_patom or self.n_conv)):
            raise ValueError("plan: bad predictive layout")
        for f in range(self.n_feat):
            if self.f_kind[f] == K_PRED and f != self.pred_f:
                raise ValueError("plan: a predictive feature that is not pred_f")
        if sum(1 for a in range(self.n_atom) if self.a_kind[a] == A_PRED) != self.n_patom:
            raise ValueError("plan: a predictive atom missing from pred_atoms")
        for i in range(self.n_patom):
            a = self.pred_atoms[i]
            if not (0 <= a < self.n_atom and self.a_kind[a] == A_PRED and self.a_s[a] == i):
                raise ValueError("plan: bad predictive atom list")
        for a in range(self.n_atom):
            k = self.a_kind[a]
            if k in (A_COUNTK, A_ABANDON, A_MODE, A_SEQ) and not 0 <= self.a_f[a] < self.n_feat:
                raise ValueError("plan: atom feature out of range")
            if k == A_PRED and (self.a_f[a] != self.pred_f or self.pred_f < 0 or
                                not 0 <= self.a_t0[a] <= S_CONVERT or
                                not 0 <= self.a_t1[a] < self.n_score or
                                not 0 <= self.a_s[a] < self.n_patom):
                raise ValueError("plan: bad predictive atom")
            if k == A_ABANDON and self.f_kind[self.a_f[a]] not in (K_ABANDON, K_ABANDON_BY):
                raise ValueError("plan: abandoned atom on another feature")
            if k == A_MODE and not (self.f_kind[self.a_f[a]] == K_MODE or (
                    self.f_kind[self.a_f[a]] == K_WLIST and self.f_key[self.a_f[a]] >= 0)):
                raise ValueError("plan: mode atom on a feature without values")
            if k == A_SEQ and self.f_kind[self.a_f[a]] != K_SEQ:
                raise ValueError("plan: seq atom on another feature")
            if k in (A_NUM, A_TIME):
                if not (0 <= self.a_t0[a] <= self.a_t1[a] <= nt and
                        0 <= self.a_t2[a] <= self.a_t3[a] <= nt):
                    raise ValueError("plan: atom term range out of range")
                if k == A_TIME:
                    for i in range(self.a_t0[a], self.a_t1[a]):
                        if self.t_kind[i] != T_FEAT or \
                                self.f_kind[self.t_a[i]] not in (K_FIRST, K_LAST):
                            raise ValueError("plan: age test term is not a first/last time")
                if k == A_NUM and (self.a_t1[a] - self.a_t0[a] > STACK or
                                   self.a_t3[a] - self.a_t2[a] > STACK):
                    raise ValueError("plan: value expression too long")
            if k == A_TRAIT and not 0 <= self.a_f[a] < self.n_trait:
                raise ValueError("plan: trait bit out of range")
            if k == A_IN and not 0 <= self.a_f[a] < self.n_seg:
                raise ValueError("plan: segment reference out of range")
        for i in range(self.time_atoms.shape[0]):
            if not 0 <= self.time_atoms[i] < self.n_atom or \
                    self.a_kind[self.time_atoms[i]] != A_TIME:
                raise ValueError("plan: time atom out of range")
        for p in range(self.n_seg):
            if not 0 <= self.p_start[p] <= self.p_start[p + 1] <= self.p_op.shape[0]:
                raise ValueError("plan: program range out of range")
            depth = 0
            for i in range(self.p_start[p], self.p_start[p + 1]):
                if self.p_op[i] == P_ATOM:
                    if not 0 <= self.p_arg[i] < self.n_atom:
                        raise ValueError("plan: program atom out of range")
                    if self.a_kind[self.p_arg[i]] == A_IN and self.a_f[self.p_arg[i]] >= p:
                        raise ValueError("plan: segment refers to a later segment")
                    depth += 1
                elif self.p_op[i] in (P_AND, P_OR):
                    depth -= 1
                    if depth < 1:
                        raise ValueError("plan: bad program")
                elif self.p_op[i] == P_NOT:
                    if depth < 1:
                        raise ValueError("plan: bad program")
                else:
                    raise ValueError("plan: bad program op")
                if depth > STACK:
                    raise ValueError("plan: program too deep")
            if depth != 1:
                raise ValueError("plan: bad program")
        for name in ("it_seg", "it_enter", "it_delay", "it_sstart", "it_send", "it_xstart",
                     "it_xend"):
            if len(getattr(self, "_arr_" + name)()) != self.n_items:
                raise ValueError(f"plan: {name} has the wrong length")
        if self.st_delay.shape[0] != self.st_onlyif.shape[0]:
            raise ValueError("plan: step arrays differ in length")
        for i in range(self.n_items):
            if self.it_kind[i] not in (0, 1) or not 0 <= self.it_seg[i] < self.n_seg \
                    or self.it_delay[i] < 0 or self.it_delay[i] >= (<int64_t>1 << 48):
                raise ValueError("plan: bad timed item")
            if self.it_kind[i] == 1 and not (
                    0 <= self.it_sstart[i] <= self.it_send[i] <= self.st_delay.shape[0]
                    and 0 <= self.it_xstart[i] <= self.it_xend[i] <= self.ex_seg.shape[0]):
                raise ValueError("plan: bad journey")
        for i in range(self.st_delay.shape[0]):
            if not 0 <= self.st_delay[i] < (<int64_t>1 << 48) or \
                    not -1 <= self.st_onlyif[i] < self.n_seg:
                raise ValueError("plan: bad journey step")
        for i in range(self.ex_seg.shape[0]):
            if not 0 <= self.ex_seg[i] < self.n_seg:
                raise ValueError("plan: bad journey exit")
        if self.es_start.shape[0] != self.n_codes + 2 or self.es_start[0] != 0:
            raise ValueError("plan: segment index has the wrong length")
        for i in range(self.n_codes + 1):
            if not 0 <= self.es_start[i] <= self.es_start[i + 1] <= self.es_list.shape[0]:
                raise ValueError("plan: segment index out of range")
        for i in range(self.es_list.shape[0]):
            if not 0 <= self.es_list[i] < self.n_seg:
                raise ValueError("plan: segment index out of range")
        for i in range(self.time_segs.shape[0]):
            if not 0 <= self.time_segs[i] < self.n_seg:
                raise ValueError("plan: time segment out of range")

    cdef void _wake_index(self) except *:
        """Derive, per event code, the time features it updates and the age atoms that read
        one of the features it updates (from the validated listener and term arrays)."""
        cdef int c, i, a
        anyf = set(self.any_feat[i] for i in range(self.any_feat.shape[0]))
        wf_start, wf_list, wa_start, wa_list = [0], [], [0], []
        for c in range(self.n_codes + 1):
            listen = set(anyf)
            if c < self.n_codes:
                listen.update(self.lst_feat[i] for i in range(self.lst_start[c],
                                                              self.lst_start[c + 1]))
            wf_list += [self.time_feats[i] for i in range(self.time_feats.shape[0])
                        if self.time_feats[i] in listen]
            wf_start.append(len(wf_list))
            for i in range(self.time_atoms.shape[0]):
                a = self.time_atoms[i]
                if any(self.t_a[j] in listen for j in range(self.a_t0[a], self.a_t1[a])):
                    wa_list.append(a)
            wa_start.append(len(wa_list))
        self.wf_start, self.wf_list = _i32(wf_start), _i32(wf_list)
        self.wa_start, self.wa_list = _i32(wa_start), _i32(wa_list)
        # which segments read each feature / atom directly, and which they refer to
        feats, atoms, refs = [], [], []
        for s in range(self.n_seg):
            fs, at, rs = set(), set(), set()
            for i in range(self.p_start[s], self.p_start[s + 1]):
                if self.p_op[i] != P_ATOM:
                    continue
                a = self.p_arg[i]
                k = self.a_kind[a]
                at.add(a)
                if k in (A_COUNTK, A_ABANDON, A_MODE, A_SEQ):
                    fs.add(self.a_f[a])
                elif k == A_IN:
                    rs.add(self.a_f[a])
                elif k == A_NUM:
                    for j in list(range(self.a_t0[a], self.a_t1[a])) + \
                            list(range(self.a_t2[a], self.a_t3[a])):
                        if self.t_kind[j] == T_FEAT:
                            fs.add(self.t_a[j])
            feats.append(fs)
            atoms.append(at)
            refs.append(rs)
        timed = set(self.time_segs[i] for i in range(self.time_segs.shape[0]))
        # every feature a segment reads directly (age tests and scores included)
        reads = []
        for s in range(self.n_seg):
            fs = set(feats[s])
            for a in atoms[s]:
                if self.a_kind[a] == A_TIME:
                    fs.update(self.t_a[j] for j in range(self.a_t0[a], self.a_t1[a]))
                elif self.a_kind[a] == A_PRED:
                    fs.add(self.a_f[a])
            reads.append(fs)
        masks = []
        for c in range(self.n_codes + 1):
            lst = [] if c == self.n_codes else \
                [self.lst_feat[i] for i in range(self.lst_start[c], self.lst_start[c + 1])]
            lst += [self.any_feat[i] for i in range(self.any_feat.shape[0])]
            seg_mask = {}
            for i in range(self.es_start[c], self.es_start[c + 1]):
                s = self.es_list[i]
                m = 0
                for pos, f in enumerate(lst):
                    if f in reads[s]:
                        m |= 1 << min(pos, 63)
                for r in refs[s]:
                    m |= seg_mask.get(r, 0)
                if not m and not refs[s]:
                    m = (1 << 64) - 1      # (an index the kernel did not derive: keep it)
                seg_mask[s] = m
                masks.append(m)
        self.es_mask = np.array(masks, dtype=np.uint64)

        def closure(direct):
            out = set(direct)
            for s in range(self.n_seg):     # references come first (checked)
                if refs[s] & out:
                    out.add(s)
            return sorted(out & timed) if out <= timed else None

        def csr(groups):
            start, lst = [0], []
            for g in groups:
                lst += g
                start.append(len(lst))
            return _i32(start), _i32(lst)

        tf = [closure({s for s in range(self.n_seg) if self.time_feats[i] in feats[s]})
              for i in range(self.time_feats.shape[0])]
        ta = [closure({s for s in range(self.n_seg) if self.time_atoms[i] in atoms[s]})
              for i in range(self.time_atoms.shape[0])]
        ps = closure({s for s in range(self.n_seg)
                      if any(self.pred_atoms[i] in atoms[s] for i in range(self.n_patom))})
        if any(g is None for g in tf + ta + [ps]):
            raise ValueError("plan: a time-dependent segment missing from time_segs")
        self.tf_start, self.tf_segs = csr(tf)
        self.ta_start, self.ta_segs = csr(ta)
        self.pred_segs = _i32(ps)
        self.tmark.assign(max(self.n_seg, 1), 0)
        self._crit_index()

    cdef void _crit_index(self) except *:
        """The windowed counts' critical drops (crit_start, crit_list)."""
        cdef int a, f, c
        crit = [set() for _ in range(self.n_feat)]
        for a in range(self.n_atom):
            f = self.a_f[a]
            if self.a_kind[a] == A_COUNTK and self.f_kind[f] == K_TOPK:
                for c in range(1, self.f_k[f] + 1):
                    if cmp_v(self.a_op[a], <double>c, self.a_k[a]) != \
                            cmp_v(self.a_op[a], <double>(c - 1), self.a_k[a]):
                        crit[f].add(c)
        start, lst = [0], []
        for f in range(self.n_feat):
            lst += sorted(crit[f], reverse=True)
            start.append(len(lst))
        self.crit_start, self.crit_list = _i32(start), _i32(lst)

    def _arr_it_seg(self): return self.it_seg
    def _arr_it_enter(self): return self.it_enter
    def _arr_it_delay(self): return self.it_delay
    def _arr_it_sstart(self): return self.it_sstart
    def _arr_it_send(self): return self.it_send
    def _arr_it_xstart(self): return self.it_xstart
    def _arr_it_xend(self): return self.it_xend
    def _len_f_event(self): return self.f_event.shape[0]
    def _len_f_event2(self): return self.f_event2.shape[0]
    def _len_f_filter(self): return self.f_filter.shape[0]
    def _len_f_val(self): return self.f_val.shape[0]
    def _len_f_key(self): return self.f_key.shape[0]
    def _len_f_k(self): return self.f_k.shape[0]
    def _len_f_ioff(self): return self.f_ioff.shape[0]
    def _len_f_foff(self): return self.f_foff.shape[0]
    def _len_f_var(self): return self.f_var.shape[0]
    def _len_f_window(self): return self.f_window.shape[0]
    def _len_f_span(self): return self.f_span.shape[0]
    def _len_a_op(self): return self.a_op.shape[0]
    def _len_a_f(self): return self.a_f.shape[0]
    def _len_a_t0(self): return self.a_t0.shape[0]
    def _len_a_t1(self): return self.a_t1.shape[0]
    def _len_a_t2(self): return self.a_t2.shape[0]
    def _len_a_t3(self): return self.a_t3.shape[0]
    def _len_a_s(self): return self.a_s.shape[0]
    def _len_a_k(self): return self.a_k.shape[0]
    def _len_a_c(self): return self.a_c.shape[0]

    cdef int _isize(self, int f):
        k = self.f_kind[f]
        if k == K_TOPK:
            return self.f_k[f]
        if k in (K_COUNT, K_FIRST, K_LAST):
            return 1
        if k == K_STATS:
            return 1
        if k == K_ABANDON:
            return 2
        if k == K_PRED:
            return 3 + RING_DAYS * self.pr_spd
        return 0

    cdef int _fsize(self, int f):
        if self.f_kind[f] == K_STATS:
            return 3
        if self.f_kind[f] == K_PRED:
            return 4
        return 1 if self.f_kind[f] == K_SUM else 0

    # ------------------------------------------------------------------ storage
    cdef void _alloc(self, int64_t cap) except *:
        cdef int64_t old = self.n_users
        cdef int64_t istride = max(self.istride, 1)
        cdef int64_t fstride = max(self.fstride, 1)
        cdef int64_t nseg = self.mstride         # bytes of membership bits a user
        cdef int64_t ntr = self.n_trait
        cdef int64_t nsc = self.n_score
        # (packed: zero codes are initial values)
        istate = np.zeros(max(cap * self.prow, 1), dtype=np.uint8) if self.packed else \
            np.zeros(cap * istride, dtype=np.int64)
        fstate = np.zeros(cap * fstride, dtype=np.float64)
        members = np.zeros(cap * nseg, dtype=np.uint8)
        # (one spare element keeps the pointers valid when no rule uses traits or scores)
        tbits = np.zeros(cap * ntr + 1, dtype=np.uint8)
        scores = np.full(cap * nsc + 1, np.nan, dtype=np.float64)
        bucket = np.zeros(cap, dtype=np.int32)
        wake = np.full(cap, INT64_MAX, dtype=np.int64)
        fresh = np.zeros(cap, dtype=np.uint8)
        cdef int64_t ni = self.n_items
        dead = np.full(cap * ni + 1, INT64_MAX, dtype=np.int64)
        jpos = np.full(cap * ni + 1, -1, dtype=np.int32)
        cdef int64_t npa = self.n_patom
        pcache = np.full(cap * npa + 1, INT64_MIN, dtype=np.int64)
        if self.cap:
            pcache[: old * npa] = self._pcache[: old * npa]
            fresh[:old] = self._fresh[:old]
            dead[: old * ni] = self._dead[: old * ni]
            jpos[: old * ni] = self._jpos[: old * ni]
            rowlen = self.prow if self.packed else istride     # (bytes or int64s)
            istate[: old * rowlen] = self._istate[: old * rowlen]
            fstate[: old * fstride] = self._fstate[: old * fstride]
            members[: old * nseg] = self._members[: old * nseg]
            tbits[: old * ntr] = self._tbits[: old * ntr]
            scores[: old * nsc] = self._scores[: old * nsc]
            bucket[:old] = self._bucket[:old]
            wake[:old] = self._wake[:old]
        self._istate, self._fstate, self._members = istate, fstate, members
        self._tbits, self._scores, self._bucket, self._wake = tbits, scores, bucket, wake
        self._fresh = fresh
        cdef uint8_t[::1] mfr = fresh
        self.fresh = &mfr[0]
        self._dead, self._jpos = dead, jpos
        self._pcache = pcache
        cdef int64_t[::1] mpc = pcache
        self.pcache = &mpc[0]
        cdef int64_t[::1] mdd = dead
        cdef int32_t[::1] mjp = jpos
        self.dead = &mdd[0]
        self.jpos = &mjp[0]
        cdef int64_t[::1] mi
        cdef uint8_t[::1] mp
        if self.packed:
            mp = istate
            self.pstate = &mp[0]
            self.istate = NULL
        else:
            mi = istate
            self.istate = &mi[0]
            self.pstate = NULL
        cdef double[::1] mf = fstate
        cdef uint8_t[::1] mm = members
        cdef uint8_t[::1] mt = tbits
        cdef double[::1] ms = scores
        cdef int32_t[::1] mb = bucket
        cdef int64_t[::1] mw = wake
        self.fstate = &mf[0]
        self.members = &mm[0]
        self.tbits = &mt[0]
        self.scores = &ms[0]
        self.bucket = &mb[0]
        self.wake = &mw[0]
        self.pools.resize(cap * self.n_var)
        self.cap = cap

    def add_users(self, int64_t n, const int32_t[::1] buckets not None):
        """Create ``n`` users (dense indices n_users .. n_users+n-1) with the given buckets."""
        cdef int64_t i, j, u
        if n < 0 or buckets.shape[0] != n:
            raise ValueError("add_users: n must equal len(buckets)")
        if self.n_users + n >= (<int64_t>1 << 32):
            raise ValueError("add_users: too many users")
        if self.n_users + n > self.cap:
            newcap = max(self.cap * 2, self.n_users + n, 16)
            self._alloc(newcap)
        if self.packed:
            memset(self.pstate + self.n_users * self.prow, 0, n * self.prow)
        for i in range(n):
            u = self.n_users + i
            if not self.packed:
                for j in range(self.istride):
                    self.istate[u * self.istride + j] = self.irow_init[j]
            for j in range(self.fstride):
                self.fstate[u * self.fstride + j] = self.frow_init[j]
            self.bucket[u] = buckets[i]
            self.fresh[u] = 1     # first evaluation covers every segment
        self.n_users += n

    # ------------------------------------------------------------------ counter rows
    cdef inline int64_t* _row(self, uint32_t u) noexcept nogil:
        """User u's counter row as int64 values, to read and write in place. Packed, it is
        the decoded copy ``rc`` (written back when another user's row is asked for, or at
        _flush): never hold it across a _row call for another user."""
        if SEGCORE_LIKELY(not self.packed):
            return self.istate + <int64_t>u * self.istride
        if <int64_t>u != self.rc_u:
            self._switch_row(u)
        return self.rc.data()

    cdef void _switch_row(self, uint32_t u) noexcept nogil:
        """Write the decoded row back and decode user u's (kept out of line, so that _row
        stays small wherever it is inlined)."""
        if self.rc_u >= 0:
            self._pack(self.rc.data(), self.pstate + self.rc_u * self.prow)
        self._unpack(self.pstate + <int64_t>u * self.prow, self.rc.data())
        self.rc_u = u

    cdef inline const char* _row_addr(self, uint32_t u) noexcept nogil:
        """Where user u's row is stored (to prefetch)."""
        if self.packed:
            return <const char*>(self.pstate + <int64_t>u * self.prow)
        return <const char*>(self.istate + <int64_t>u * self.istride)

    cdef inline void _unpack(self, const uint8_t* p, int64_t* out) noexcept nogil:
        segcore_unpack(p, out, self.iinit, self.istride)

    cdef inline void _pack(self, const int64_t* v, uint8_t* p) noexcept nogil:
        segcore_pack(v, p, self.iinit, self.istride)

    cdef inline void _flush(self) noexcept nogil:
        """Write the decoded row back to the packed table (before reading the table whole)."""
        if self.packed and self.rc_u >= 0:
            self._pack(self.rc.data(), self.pstate + self.rc_u * self.prow)
            self.rc_u = -1

    cdef inline bint _fits(self, int64_t v, int j) noexcept nogil:
        """Whether slot j of a packed row can hold v."""
        return v == self.iinit[j] or 0 <= v <= PACK_MAX

    cdef inline void _admit_ts(self, int64_t ts) except *:
        """Before an event at ts: turn packed rows to int64 if they cannot hold ts."""
        if self.packed and ts > PACK_MAX:
            self._widen()

    cdef void _widen(self) except *:
        """Store the rows as int64 from now on (a value arrived that packed rows cannot
        hold)."""
        if not self.packed:
            return
        self._flush()
        wide = np.empty(max(self.cap * self.istride, 1), dtype=np.int64)
        cdef int64_t[::1] mw = wide
        cdef int64_t u
        for u in range(self.cap):
            self._unpack(self.pstate + u * self.prow, &mw[u * self.istride])
        self._istate = wide
        self.istate = &mw[0]
        self.pstate = NULL
        self.packed = False

    cdef void _load_row(self, int64_t u, int64_t* out) noexcept nogil:
        """Copy user u's row (decoded) to out."""
        if self.packed and u != self.rc_u:
            self._unpack(self.pstate + u * self.prow, out)
        elif self.istride:
            memcpy(out, self._row(<uint32_t>u), self.istride * sizeof(int64_t))

    cdef void _store_row(self, int64_t u, const int64_t* v) except *:
        """Set user u's row to v, turning the table to int64 rows if v does not fit."""
        cdef int j
        if self.packed:
            for j in range(self.istride):
                if not self._fits(v[j], j):
                    self._widen()
                    break
        if self.packed and u != self.rc_u:
            self._pack(v, self.pstate + u * self.prow)
        elif self.istride:
            memcpy(self._row(<uint32_t>u), v, self.istride * sizeof(int64_t))

    # ------------------------------------------------------------------ feature updates
    cdef inline bint _in_window(self, int f, int64_t ts, int64_t t) noexcept nogil:
        cdef int64_t w = self.f_window[f]
        return w == 0 or ts > t - w

    cdef uint64_t _apply(self, uint32_t u, int32_t e, int64_t ts, const uint8_t* fp,
                         const double* vp, const int64_t* kp) noexcept nogil:
        """Apply one event to the features listening to it; bit ``min(i, 63)`` of the result
        is set when the i-th of them (the event code's listeners, then the any-event ones)
        changed state."""
        cdef int32_t i
        cdef int bit = 0
        cdef uint64_t chg = 0
        if 0 <= e < self.n_codes:
            for i in range(self.lst_start[e], self.lst_start[e + 1]):
                if self._apply_one(self.lst_feat[i], u, e, ts, fp, vp, kp):
                    chg |= (<uint64_t>1) << (bit if bit < 63 else 63)
                bit += 1
        for i in range(self.any_feat.shape[0]):
            if self._apply_one(self.any_feat[i], u, e, ts, fp, vp, kp):
                chg |= (<uint64_t>1) << (bit if bit < 63 else 63)
            bit += 1
        return chg

    cdef bint _apply_one(self, int f, uint32_t u, int32_t e, int64_t ts, const uint8_t* fp,
                         const double* vp, const int64_t* kp) noexcept nogil:
        """Apply one event to feature f; False when f's state did not change."""
        cdef int kind = self.f_kind[f]
        cdef int64_t* ist = self._row(u) + self.f_ioff[f]
        cdef double* fst
        cdef int k, j, pos
        cdef double v = NAN
        cdef int64_t key = -1
        cdef vector[Entry]* vec
        cdef Entry ent
        cdef size_t n, lo, hi, mid
        if self.f_filter[f] >= 0 and not fp[self.f_filter[f]]:
            return False
        if self.f_val[f] >= 0:
            v = vp[self.f_val[f]]
        if self.f_key[f] >= 0:
            key = kp[self.f_key[f]]
        if kind == K_TOPK:
            if not self._in_window(f, ts, self.now):
                return False
            k = self.f_k[f]
            # slots sorted descending; an equal ts goes after the existing ones
            pos = 0
            while pos < k and ist[pos] >= ts:
                pos += 1
            if pos == k:
                return False
            j = k - 1
            while j > pos:
                ist[j] = ist[j - 1]
                j -= 1
            ist[pos] = ts
        elif kind == K_COUNT:
            ist[0] += 1
        elif kind == K_STATS:
            if isnan(v):
                return False
            fst = self.fstate + <int64_t>u * self.fstride + self.f_foff[f]
            if ist[0] == 0:
                fst[1] = v
                fst[2] = v
            else:
                if v < fst[1]:
                    fst[1] = v
                if v > fst[2]:
                    fst[2] = v
            ist[0] += 1
            fst[0] += v
        elif kind == K_SUM:
            if isnan(v):
                return False
            (self.fstate + <int64_t>u * self.fstride + self.f_foff[f])[0] += v
        elif kind == K_FIRST:
            if ts >= ist[0]:
                return False
            ist[0] = ts
        elif kind == K_LAST:
            if ts <= ist[0]:
                return False
            ist[0] = ts
        elif kind == K_WLIST:
            if not self._in_window(f, ts, self.now):
                return False
            if self.f_val[f] >= 0 and isnan(v):
                return False
            if self.f_key[f] >= 0 and key < 0:
                return False
            vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
            ent.ts = ts
            ent.val = v
            ent.key = key
            ent.aux = 0
            insert_by_ts(vec, ent)
        elif kind == K_DISTINCT:
            if key < 0:
                return False
            vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
            lo = key_lower_bound(vec, key)
            if lo < vec.size() and vec[0][lo].key == key:
                return False
            ent.ts = ts
            ent.val = 0
            ent.key = key
            ent.aux = 0
            vec.insert(vec.begin() + lo, ent)
        elif kind == K_ABANDON:
            pos = 0
            if e == self.f_event[f] and ts > ist[0]:
                ist[0] = ts
                pos = 1
            if e == self.f_event2[f] and ts > ist[1]:
                ist[1] = ts
                pos = 1
            return pos != 0
        elif kind == K_ABANDON_BY:
            if key < 0:
                return False
            vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
            n = vec.size()
            for lo in range(n):
                if vec[0][lo].key == key:
                    break
            else:
                ent.ts = INT64_MIN     # latest A
                ent.aux = INT64_MIN    # latest B
                ent.key = key
                ent.val = 0
                vec.push_back(ent)
                lo = n
            if e == self.f_event[f] and ts > vec[0][lo].ts:
                vec[0][lo].ts = ts
            if e == self.f_event2[f] and ts > vec[0][lo].aux:
                vec[0][lo].aux = ts
        elif kind == K_MODE:
            if key < 0:
                return False
            self._mode_add(&self.pools[<size_t>u * self.n_var + self.f_var[f]], ts, key)
        elif kind == K_SEQ:
            self._seq_add(u, f, e, ts, fp, key)
        elif kind == K_SESS:
            self._sess_add(&self.pools[<size_t>u * self.n_var + self.f_var[f]], ts,
                           self.f_window[f], self.f_span[f])
        elif kind == K_PRED:
            self._pred_add(u, f, e, ts, v)
        return True

    # ------------------------------------------------------------------ predictive scores
    cdef inline void _pred_forget_crossings(self, uint32_t u) noexcept nogil:
        cdef int i
        for i in range(self.n_patom):
            self.pcache[<int64_t>u * self.n_patom + i] = INT64_MIN

    cdef void _pred_add(self, uint32_t u, int f, int32_t e, int64_t ts, double v) noexcept nogil:
        """Purchase statistics (first/last purchase, count, amounts) and the day ring: per
        day, the number of events of any type and of each convert event type."""
        cdef int64_t* ist = self._row(u) + self.f_ioff[f]
        cdef double* fst = self.fstate + <int64_t>u * self.fstride + self.f_foff[f]
        cdef uint64_t* ring = <uint64_t*>(ist + 3)
        cdef int64_t d = floordiv(ts, DAY_MS)
        cdef int j
        if e == self.pr_buy:
            fst[0] += 1
            if ts < ist[0]:
                ist[0] = ts
                fst[1] = v
            if ts > ist[1]:
                ist[1] = ts
            if not isnan(v):
                fst[2] += v
                fst[3] += 1
            self._pred_forget_crossings(u)
        if not self._ring_advance(ist, d):
            return                      # older than the ring: no score reads that day
        self._ring_inc(ring, d, 0)
        for j in range(self.n_conv):
            if e == self.pr_conv[j]:
                self._ring_inc(ring, d, j + 1)

    cdef bint _ring_advance(self, int64_t* ist, int64_t d) noexcept nogil:
        """Make day d the ring's newest if it is later (the days in between start empty);
        False when d is older than the ring."""
        cdef uint64_t* ring = <uint64_t*>(ist + 3)
        cdef int64_t head = ist[2], x
        cdef int j
        if head == INT64_MIN or d > head:
            x = d - RING_DAYS + 1 if head == INT64_MIN or d - head >= RING_DAYS else head + 1
            while x <= d:
                for j in range(self.pr_spd):
                    ring[self._ring_slot(x, 0) + j] = 0
                x += 1
            ist[2] = d
            return True
        return d > head - RING_DAYS

    cdef inline size_t _ring_slot(self, int64_t d, int j) noexcept nogil:
        cdef int64_t m = d % RING_DAYS
        if m < 0:
            m += RING_DAYS
        return <size_t>(m * self.pr_spd + j // 4)

    cdef inline void _ring_inc(self, uint64_t* ring, int64_t d, int j) noexcept nogil:
        cdef uint64_t* slot = ring + self._ring_slot(d, j)
        cdef int sh = 16 * (j % 4)
        if ((slot[0] >> sh) & 0xFFFF) != 0xFFFF:      # saturates at 65535 a day
            slot[0] += (<uint64_t>1) << sh

    cdef inline void _ring_add(self, uint64_t* ring, int64_t d, int j, int64_t n) noexcept nogil:
        cdef uint64_t* slot = ring + self._ring_slot(d, j)
        cdef int sh = 16 * (j % 4)
        cdef int64_t have = <int64_t>((slot[0] >> sh) & 0xFFFF)
        if have + n > 0xFFFF:
            n = 0xFFFF - have
        slot[0] += (<uint64_t>n) << sh

    cdef inline int64_t _ring_get(self, const uint64_t* ring, int64_t d, int j) noexcept nogil:
        return <int64_t>((ring[self._ring_slot(d, j)] >> (16 * (j % 4))) & 0xFFFF)

    cdef bint _conv_features(self, uint32_t u, int64_t D, double* out) noexcept nogil:
        """score.convert's features on day D from the ring: log1p of each convert event's
        count over days D-6..D, active days / 7, days since the last active day / 7. False
        when the user had no event in those days."""
        cdef int64_t* ist = self._row(u) + self.f_ioff[self.pred_f]
        cdef const uint64_t* ring = <const uint64_t*>(ist + 3)
        cdef int64_t head = ist[2], d, lastd = INT64_MIN
        cdef int j, active = 0
        cdef double cnt[8]
        if head == INT64_MIN:
            return False
        for j in range(self.n_conv):
            cnt[j] = 0
        for d in range(D - 6, D + 1):
            if d > head or d <= head - RING_DAYS:
                continue
            if self._ring_get(ring, d, 0) > 0:
                active += 1
                lastd = d
                for j in range(self.n_conv):
                    cnt[j] += <double>self._ring_get(ring, d, j + 1)
        if active == 0:
            return False
        for j in range(self.n_conv):
            out[j] = log1p(cnt[j])
        out[self.n_conv] = active / 7.0
        out[self.n_conv + 1] = <double>(D - lastd) / 7.0
        return True

    cdef double _expected(self, double t, double x, double tx, double T) noexcept nogil:
        """BG/NBD E[purchases in the next t days | x, t_x, T] (docs/predictive.md): the
        hypergeometric term rewritten by two Pfaff transformations so that its series
        converges geometrically for every x."""
        cdef double r = self.pp[0], al = self.pp[1], a = self.pp[2], b = self.pp[3]
        cdef double c = a + b + x - 1.0, A = a + b - 1.0 - r, a1 = a - 1.0
        cdef double z = t / (al + T + t), L = log1p(t / (al + T))
        cdef double term, R = 0.0, head, E
        cdef int k = 1
        if c == 0:
            return NAN
        term = A * z / c
        while k < MAX_SERIES:
            R += term
            if term == 0 or fabs(term) <= 1e-17 * fabs(R):
                break
            if c + k == 0:
                return NAN
            term *= (A + k) * (a + k - 1.0) * z / ((c + k) * (k + 1.0))
            k += 1
        head = L if fabs(a1) < 1e-12 else -expm1(-a1 * L) / a1
        E = c * (head - exp(-a1 * L) * R)
        if x > 0:
            E /= 1.0 + (a / (b + x - 1.0)) * exp((r + x) * log((al + T) / (al + tx)))
        return E

    cdef bint _pred_value(self, uint32_t u, int sid, int64_t t, double* out) noexcept nogil:
        """The model's value of built-in score ``sid`` for u at t (False: missing)."""
        cdef int64_t* ist = self._row(u) + self.f_ioff[self.pred_f]
        cdef double* fst = self.fstate + <int64_t>u * self.fstride + self.f_foff[self.pred_f]
        cdef double x, tx, T, pa, E, xm, z, feats[10]
        cdef double r = self.pp[0], al = self.pp[1], a = self.pp[2], b = self.pp[3]
        cdef int j
        if sid == S_CONVERT:
            if fst[0] > 0 or isnan(self.pp[PP_COEF]):
                return False
            if not self._conv_features(u, floordiv(t, DAY_MS), feats):
                return False
            z = self.pp[PP_COEF]
            for j in range(self.n_conv + 2):
                z += self.pp[PP_COEF + 1 + j] * feats[j]
            out[0] = 1.0 / (1.0 + exp(-z))
            return True
        if fst[0] < 1 or isnan(r):
            return False
        x = fst[0] - 1.0
        tx = <double>(ist[1] - ist[0]) / <double>DAY_MS
        T = <double>((t if t > ist[1] else ist[1]) - ist[0]) / <double>DAY_MS
        if sid == S_P_ALIVE or sid == S_CHURN:
            pa = 1.0 if x <= 0 else 1.0 / (1.0 + (a / (b + x - 1.0)) *
                                           exp((r + x) * log((al + T) / (al + tx))))
            out[0] = pa if sid == S_P_ALIVE else 1.0 - pa
            return not isnan(out[0])
        E = self._expected(self.pp[7], x, tx, T)
        if sid == S_EXPECTED:
            out[0] = E
            return not isnan(E)
        if isnan(self.pp[4]):
            return False
        # Gamma-Gamma spend: the mean of the repeat purchases with an amount, shrunk to the
        # population mean p v / (q - 1)
        xm = fst[3] - (0.0 if isnan(fst[1]) else 1.0)
        if xm >= 1:
            out[0] = E * (self.pp[4] * (self.pp[6] + (fst[2] - (0.0 if isnan(fst[1]) else fst[1])))
                          / (self.pp[4] * xm + self.pp[5] - 1.0))
        else:
            out[0] = E * (self.pp[4] * self.pp[6] / (self.pp[5] - 1.0))
        return not isnan(out[0])

    cdef int _pred_sign(self, uint32_t u, int a, int64_t t) noexcept nogil:
        """sign(value - k) of predictive atom a for u at t; 2 when the value is missing."""
        cdef double v
        if not self._pred_value(u, self.a_t0[a], t, &v):
            return 2
        return (v > self.a_k[a]) - (v < self.a_k[a])

    cdef int64_t _pred_next(self, uint32_t u, int a, int64_t t) noexcept nogil:
        """The next instant > t at which predictive atom a can change for u without events.

        Convert scores change at UTC midnights only: try each until the user's days have left
        the window. The BG/NBD scores are monotone in time for a fixed history, so sign(value
        - k) changes at most once from + or - towards the other: double the step until it
        differs, then bisect to the exact millisecond (cached until u's purchases change)."""
        cdef int64_t* c
        cdef int64_t D, k, last, lo, hi, mid, step
        cdef int64_t* ist
        cdef int s0
        cdef bint cur
        if not isnan(self.scores[<int64_t>u * self.n_score + self.a_t1[a]]):
            return INT64_MAX                # the caller's value holds until they change it
        if self.a_t0[a] == S_CONVERT:
            if isnan(self.pp[PP_COEF]):
                return INT64_MAX
            ist = self._row(u) + self.f_ioff[self.pred_f]
            if ist[2] == INT64_MIN:
                return INT64_MAX
            D = floordiv(t, DAY_MS)
            last = ist[2] + 7 - D           # from that day on, no event is in the window
            cur = self._atom(u, a, t)
            k = 1
            while k <= last and k <= RING_DAYS + 8:
                if D + k > INT64_MAX // DAY_MS - 1:
                    return INT64_MAX
                if self._atom(u, a, (D + k) * DAY_MS) != cur:
                    return (D + k) * DAY_MS
                k += 1
            return INT64_MAX
        c = self.pcache + <int64_t>u * self.n_patom + self.a_s[a]
        if c[0] > t:
            return c[0]
        if t > INT64_MAX - 4 * PRED_REACH:
            return INT64_MAX
        s0 = self._pred_sign(u, a, t)
        if s0 == 2:
            c[0] = INT64_MAX                # missing until the user's purchases change
            return INT64_MAX
        lo = t
        step = 1
        while True:
            hi = t + step
            if self._pred_sign(u, a, hi) != s0:
                break
            if step >= PRED_REACH:
                c[0] = hi                   # nothing this side of 2230 years: look again then
                return hi
            lo = hi
            step *= 2
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            if self._pred_sign(u, a, mid) == s0:
                lo = mid
            else:
                hi = mid
        c[0] = hi
        return hi

    cdef void _mode_add(self, vector[Entry]* vec, int64_t ts, int64_t key) noexcept nogil:
        # entries sorted by key: ts/val = the latest event (ts, per-user arrival stamp) of the
        # value, aux = its count; the stamp is the number of events counted before this one
        cdef size_t lo = key_lower_bound(vec, key), i
        cdef int64_t total = 0
        cdef Entry ent
        for i in range(vec.size()):
            total += vec[0][i].aux
        if lo < vec.size() and vec[0][lo].key == key:
            vec[0][lo].aux += 1
            if ts >= vec[0][lo].ts:
                vec[0][lo].ts = ts
                vec[0][lo].val = <double>total
            return
        ent.ts = ts
        ent.val = <double>total
        ent.key = key
        ent.aux = 1
        vec.insert(vec.begin() + lo, ent)

    cdef void _seq_add(self, uint32_t u, int f, int32_t e, int64_t ts, const uint8_t* fp,
                       int64_t key) noexcept nogil:
        # the user's events of the steps, sorted by (ts, arrival); aux = the steps they match
        cdef int k, s0 = self.sq_start[f]
        cdef int64_t mask = 0
        cdef int64_t w = self.f_window[f]
        cdef vector[Entry]* vec
        cdef size_t n
        cdef Entry ent
        for k in range(s0, self.sq_start[f + 1]):
            if self.sq_event[k] == e and (self.sq_filter[k] < 0 or fp[self.sq_filter[k]]):
                mask |= (<int64_t>1) << (k - s0)
        if mask == 0:
            return
        if self.f_key[f] >= 0 and key < 0:
            return
        self.sc_valid = False
        if w > 0 and ts <= self.now - w:
            return
        vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
        ent.ts = ts
        ent.val = 0
        ent.key = key
        ent.aux = mask
        insert_by_ts(vec, ent)
        if <int64_t>vec.size() > self.seq_cap:
            vec.erase(vec.begin())
            self.seq_evicted += 1

    cdef void _sess_add(self, vector[Entry]* vec, int64_t ts, int64_t w,
                        int64_t T) noexcept nogil:
        # sessions sorted by start (ts); aux = end, key = number of events
        cdef size_t n = vec.size(), i
        cdef bint jp, jn
        cdef Entry ent
        if w > 0 and ts <= self.now - w - T:
            return          # can no longer touch a session that starts inside the window
        i = n
        while i > 0 and vec[0][i - 1].ts > ts:
            i -= 1
        jp = i > 0 and ts - vec[0][i - 1].aux < T
        jn = i < n and vec[0][i].ts - ts < T
        if jp and jn:
            if vec[0][i].aux > vec[0][i - 1].aux:
                vec[0][i - 1].aux = vec[0][i].aux
            vec[0][i - 1].key += vec[0][i].key + 1
            vec.erase(vec.begin() + i)
        elif jp:
            if ts > vec[0][i - 1].aux:
                vec[0][i - 1].aux = ts
            vec[0][i - 1].key += 1
        elif jn:
            vec[0][i].ts = ts
            vec[0][i].key += 1
        else:
            ent.ts = ts
            ent.aux = ts
            ent.key = 1
            ent.val = 0
            vec.insert(vec.begin() + i, ent)

    # ------------------------------------------------------------------ feature values
    cdef void _prune(self, uint32_t u, int f, int64_t t) noexcept nogil:
        # Drop window entries that can never count again (now only moves forward).
        cdef vector[Entry]* vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
        cdef int64_t w = self.f_window[f]
        cdef size_t i = 0
        cdef size_t n = vec.size()
        while i < n and vec[0][i].ts <= t - w:
            i += 1
        if i:
            vec.erase(vec.begin(), vec.begin() + i)

    cdef size_t _sess_lo(self, uint32_t u, int f, int64_t t) noexcept nogil:
        """Drop the sessions that can no longer matter (windowed: ended at or before
        ``t - W - T``); returns the index of the first one that started inside the window."""
        cdef vector[Entry]* vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
        cdef int64_t w = self.f_window[f]
        cdef size_t i = 0
        cdef size_t n = vec.size()
        if w == 0:
            return 0
        while i < n and vec[0][i].aux <= t - w - self.f_span[f]:
            i += 1
        if i:
            vec.erase(vec.begin(), vec.begin() + i)
            n = vec.size()
        i = 0
        while i < n and vec[0][i].ts <= t - w:
            i += 1
        return i

    cdef int64_t _mode_key(self, uint32_t u, int f, int64_t t) noexcept nogil:
        """The most frequent value code (ties: the latest event by ts, then arrival), or -1."""
        cdef vector[Entry]* vec
        cdef size_t i, n
        cdef int64_t best = -1, cnt, bc = 0
        cdef double pos, bp = -1
        cdef int64_t bts = INT64_MIN
        if self.f_kind[f] == K_MODE:
            vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
            for i in range(vec.size()):
                if vec[0][i].aux > bc or (vec[0][i].aux == bc and (
                        vec[0][i].ts > bts or (vec[0][i].ts == bts and vec[0][i].val > bp))):
                    bc = vec[0][i].aux
                    bts = vec[0][i].ts
                    bp = vec[0][i].val
                    best = vec[0][i].key
            return best
        self._prune(u, f, t)
        vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
        n = vec.size()
        if n == 0:
            return -1
        self.scratch.assign(vec.begin(), vec.end())
        for i in range(n):
            self.scratch[i].val = <double>i         # position = (ts, arrival) order
        sort(self.scratch.begin(), self.scratch.end(), entry_key_val_less)
        cnt = 0
        for i in range(n):
            cnt += 1
            if i + 1 == n or self.scratch[i + 1].key != self.scratch[i].key:
                pos = self.scratch[i].val           # the group's latest position
                if cnt > bc or (cnt == bc and pos > bp):
                    bc = cnt
                    bp = pos
                    best = self.scratch[i].key
                cnt = 0
        return best

    cdef bint _seq_eval(self, uint32_t u, int f, int64_t t, int64_t* nxt) noexcept nogil:
        """Whether seq feature f holds at t; ``nxt``: the next instant > t it can change
        without new events (docs/patterns.md)."""
        cdef vector[Entry]* vec
        cdef int64_t w = self.f_window[f]
        cdef int64_t D = self.f_span[f]
        cdef int s0 = self.sq_start[f]
        cdef int m = self.sq_start[f + 1] - s0
        cdef bint neg = self.sq_neg[s0 + m - 1] != 0
        cdef bint keyed = self.f_key[f] >= 0
        cdef int64_t L[MAX_STEPS]
        cdef int64_t NL[MAX_STEPS]
        cdef int64_t best = INT64_MIN, cand, ta, st, en
        cdef size_t n, gs, ge, i, j, x, y
        cdef int k
        cdef bint res = False, cancelled
        cdef Entry* ev
        if self.sc_valid and self.sc_u == u and self.sc_f == f and self.sc_t == t:
            nxt[0] = self.sc_nxt            # the atom and the timer ask at the same instant
            return self.sc_res
        nxt[0] = INT64_MAX
        if m < 1 or m > MAX_STEPS:
            return False
        if w > 0:
            self._prune(u, f, t)
        vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
        n = vec.size()
        if n == 0:
            return False
        if keyed:
            self.scratch.assign(vec.begin(), vec.end())
            for i in range(n):
                self.scratch[i].val = <double>i
            sort(self.scratch.begin(), self.scratch.end(), entry_key_ts_less)
            ev = &self.scratch[0]
        else:
            ev = &vec[0][0]                 # already in (ts, arrival) order
        gs = 0
        while gs < n:
            ge = gs + 1
            while ge < n and (not keyed or ev[ge].key == ev[gs].key):
                ge += 1
            if not neg:
                for k in range(m):
                    L[k] = INT64_MIN
                i = gs
                while i < ge:
                    j = i
                    while j < ge and ev[j].ts == ev[i].ts:
                        j += 1
                    for k in range(m):
                        NL[k] = L[k]
                    for x in range(i, j):
                        for k in range(m):
                            if not (ev[x].aux >> k) & 1:
                                continue
                            if k == 0:
                                cand = ev[x].ts
                            elif L[k - 1] != INT64_MIN and (
                                    D == 0 or ev[x].ts - L[k - 1] < D):
                                cand = L[k - 1]
                            else:
                                continue
                            if cand > NL[k]:
                                NL[k] = cand
                    for k in range(m):
                        L[k] = NL[k]
                    i = j
                if L[m - 1] > best:
                    best = L[m - 1]
            else:
                for x in range(gs, ge):
                    if not ev[x].aux & 1:
                        continue
                    ta = ev[x].ts
                    y = x
                    while y > gs and ev[y - 1].ts >= ta:
                        y -= 1
                    cancelled = False
                    while y < ge and ev[y].ts < ta + D:
                        if y != x and ev[y].ts >= ta and (ev[y].aux >> 1) & 1:
                            cancelled = True
                            break
                        y += 1
                    if cancelled:
                        continue
                    st = ta + D
                    en = ta + w if w > 0 else INT64_MAX
                    if st <= t < en:
                        res = True
                        if en < nxt[0]:
                            nxt[0] = en
                    elif st > t and st < en and st < nxt[0]:
                        nxt[0] = st
            gs = ge
        if not neg:
            if best != INT64_MIN and (w == 0 or best > t - w):
                res = True
                if w > 0:
                    nxt[0] = best + w
        self.sc_valid = True
        self.sc_u, self.sc_f, self.sc_t, self.sc_nxt, self.sc_res = u, f, t, nxt[0], res
        return res

    cdef int64_t _topk_count(self, uint32_t u, int f, int64_t t) noexcept nogil:
        cdef int64_t* ist = self._row(u) + self.f_ioff[f]
        cdef int k = self.f_k[f]
        cdef int64_t lim = t - self.f_window[f]
        cdef int c = 0
        while c < k and ist[c] > lim:
            c += 1
        return c

    cdef bint _value(self, uint32_t u, int f, int fn, int64_t t, double* out) noexcept nogil:
        """Feature value at time t; returns False when the value is missing."""
        cdef int kind = self.f_kind[f]
        cdef int64_t* ist = self._row(u) + self.f_ioff[f]
        cdef double* fst = self.fstate + <int64_t>u * self.fstride + self.f_foff[f]
        cdef vector[Entry]* vec
        cdef size_t i, n
        cdef double s, m
        cdef int64_t c
        if kind == K_COUNT:
            out[0] = <double>ist[0]
            return True
        if kind == K_TOPK:
            out[0] = <double>self._topk_count(u, f, t)
            return True
        if kind == K_STATS:
            if fn == FN_COUNT:
                out[0] = <double>ist[0]
                return True
            if fn == FN_SUM:
                out[0] = fst[0]
                return True
            if ist[0] == 0:
                return False
            if fn == FN_AVG:
                out[0] = fst[0] / <double>ist[0]
            elif fn == FN_MIN:
                out[0] = fst[1]
            else:
                out[0] = fst[2]
            return True
        if kind == K_SUM:
            out[0] = fst[0]
            return True
        if kind == K_FIRST:
            if ist[0] == INT64_MAX:
                return False
            out[0] = <double>ist[0]
            return True
        if kind == K_LAST:
            if ist[0] == INT64_MIN:
                return False
            out[0] = <double>ist[0]
            return True
        if kind == K_DISTINCT:
            out[0] = <double>self.pools[<size_t>u * self.n_var + self.f_var[f]].size()
            return True
        if kind == K_SESS:
            return self._sess_value(u, f, fn, t, out)
        if kind == K_WLIST:
            self._prune(u, f, t)
            vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
            n = vec.size()
            if fn == FN_COUNT:
                out[0] = <double>n
                return True
            if fn == FN_DISTINCT:
                self.scratch.assign(vec.begin(), vec.end())
                sort(self.scratch.begin(), self.scratch.end(), entry_key_less)
                c = 0
                for i in range(n):
                    if i == 0 or self.scratch[i].key != self.scratch[i - 1].key:
                        c += 1
                out[0] = <double>c
                return True
            if fn == FN_SUM or fn == FN_AVG:
                s = 0.0
                for i in range(n):
                    s += vec[0][i].val
                if fn == FN_SUM:
                    out[0] = s
                    return True
                if n == 0:
                    return False
                out[0] = s / <double>n
                return True
            if n == 0:
                return False
            m = vec[0][0].val
            for i in range(1, n):
                if fn == FN_MIN and vec[0][i].val < m:
                    m = vec[0][i].val
                elif fn == FN_MAX and vec[0][i].val > m:
                    m = vec[0][i].val
            out[0] = m
            return True
        return False

    cdef bint _sess_value(self, uint32_t u, int f, int fn, int64_t t,
                          double* out) noexcept nogil:
        cdef size_t lo = self._sess_lo(u, f, t), i, n
        cdef vector[Entry]* vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
        cdef bint ev = fn >= FN_EV and fn < FN_LAST_DUR
        cdef int base = fn - FN_EV if ev else fn
        cdef double s = 0.0, m = 0.0, x
        n = vec.size()
        if fn == FN_LAST_DUR or fn == FN_LAST_EV:
            if n == 0:
                return False
            out[0] = <double>(vec[0][n - 1].key if fn == FN_LAST_EV
                              else vec[0][n - 1].aux - vec[0][n - 1].ts)
            return True
        if base == FN_COUNT:
            out[0] = <double>(n - lo)
            return True
        if base == FN_SUM or base == FN_AVG:
            for i in range(lo, n):
                s += <double>(vec[0][i].key if ev else vec[0][i].aux - vec[0][i].ts)
            if base == FN_SUM:
                out[0] = s
                return True
            if n == lo:
                return False
            out[0] = s / <double>(n - lo)
            return True
        if base != FN_MIN and base != FN_MAX:
            return False
        if n == lo:
            return False
        for i in range(lo, n):
            x = <double>(vec[0][i].key if ev else vec[0][i].aux - vec[0][i].ts)
            if i == lo or (base == FN_MIN and x < m) or (base == FN_MAX and x > m):
                m = x
        out[0] = m
        return True

    cdef bint _time_value(self, uint32_t u, int f, int64_t* out) noexcept nogil:
        cdef int64_t v = self._row(u)[self.f_ioff[f]]
        if (self.f_kind[f] == K_FIRST and v == INT64_MAX) or \
                (self.f_kind[f] == K_LAST and v == INT64_MIN):
            return False
        out[0] = v
        return True

    cdef int64_t _next_change(self, uint32_t u, int f, int64_t t) noexcept nogil:
        """Next instant > t at which feature f's value can change without new events."""
        cdef int kind = self.f_kind[f]
        cdef int64_t* ist = self._row(u) + self.f_ioff[f]
        cdef int64_t w = self.f_window[f]
        cdef int64_t best = INT64_MAX
        cdef int c, j
        cdef vector[Entry]* vec
        cdef size_t i
        if kind == K_TOPK:
            # the count is >= c while its c-th latest event is in the window: the next drop
            # that flips an atom is the expiry of the c-th latest for the largest such
            # critical c (the others' drops change no atom's value)
            for j in range(self.crit_start[f], self.crit_start[f + 1]):
                c = self.crit_list[j]
                if ist[c - 1] > t - w:
                    return ist[c - 1] + w
            return INT64_MAX
        if kind == K_WLIST:
            self._prune(u, f, t)
            vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
            if vec.size():
                return vec[0][0].ts + w
            return INT64_MAX
        if kind == K_ABANDON:
            if ist[0] != INT64_MIN and ist[1] < ist[0] and ist[0] + w > t:
                return ist[0] + w
            return INT64_MAX
        if kind == K_SESS:
            if w == 0:
                return INT64_MAX
            i = self._sess_lo(u, f, t)
            vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
            if i < vec.size():
                return vec[0][i].ts + w
            return INT64_MAX
        if kind == K_SEQ:
            self._seq_eval(u, f, t, &best)
            return best
        if kind == K_ABANDON_BY:
            vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
            for i in range(vec.size()):
                if vec[0][i].ts != INT64_MIN and vec[0][i].aux < vec[0][i].ts and \
                        vec[0][i].ts + w > t and vec[0][i].ts + w < best:
                    best = vec[0][i].ts + w
            return best
        return INT64_MAX

    # ------------------------------------------------------------------ atoms
    cdef bint _num_side(self, uint32_t u, int a, int b, int64_t t, double* out) noexcept nogil:
        cdef double st[STACK]
        cdef int sp = 0
        cdef int i, k
        cdef double v
        for i in range(a, b):
            k = self.t_kind[i]
            if k == T_CONST:
                st[sp] = self.t_v[i]
                sp += 1
            elif k == T_FEAT:
                if not self._value(u, self.t_a[i], self.t_b[i], t, &v):
                    return False
                st[sp] = v
                sp += 1
            elif k == T_SCORE:
                v = self.scores[<int64_t>u * max(self.n_score, 1) + self.t_a[i]]
                if isnan(v):
                    return False
                st[sp] = v
                sp += 1
            elif k == T_ADD:
                sp -= 1
                st[sp - 1] = st[sp - 1] + st[sp]
            elif k == T_SUB:
                sp -= 1
                st[sp - 1] = st[sp - 1] - st[sp]
            elif k == T_DIV:
                sp -= 1
                if st[sp] == 0:
                    return False        # share() of no events is missing
                st[sp - 1] = st[sp - 1] / st[sp]
        out[0] = st[0]
        return True

    cdef bint _time_lin(self, uint32_t u, int a, int64_t* out) noexcept nogil:
        """The now-free part A of an age test ``A + s*now op 0``; False if a term is missing."""
        cdef int64_t acc = self.a_c[a]
        cdef int64_t v
        cdef int i
        for i in range(self.a_t0[a], self.a_t1[a]):
            if not self._time_value(u, self.t_a[i], &v):
                return False
            acc += v * self.t_b[i]
        out[0] = acc
        return True

    cdef int64_t _time_next_flip(self, uint32_t u, int a, int64_t t) noexcept nogil:
        cdef int64_t A, X
        cdef int op = self.a_op[a]
        if not self._time_lin(u, a, &A):
            return INT64_MAX
        # A + s*now op 0  <=>  now op' X
        if self.a_s[a] == 1:
            X = -A
        else:
            X = A
            if op == OP_LT:
                op = OP_GT
            elif op == OP_LE:
                op = OP_GE
            elif op == OP_GT:
                op = OP_LT
            elif op == OP_GE:
                op = OP_LE
        if op == OP_LT or op == OP_GE:
            return X if t < X else INT64_MAX
        if op == OP_LE or op == OP_GT:
            return X + 1 if t < X + 1 else INT64_MAX
        # == and != flip at X and at X + 1
        if t < X:
            return X
        if t < X + 1:
            return X + 1
        return INT64_MAX

    cdef bint _atom(self, uint32_t u, int a, int64_t t) noexcept nogil:
        cdef int kind = self.a_kind[a]
        cdef int f = self.a_f[a]
        cdef int64_t* ist
        cdef double l, r
        cdef int64_t A
        cdef vector[Entry]* vec
        cdef size_t i
        if kind == A_CONST:
            return self.a_k[a] != 0
        if kind == A_COUNTK:
            if self.f_kind[f] == K_TOPK:
                l = <double>self._topk_count(u, f, t)
            else:
                self._value(u, f, FN_COUNT, t, &l)
            return cmp_v(self.a_op[a], l, self.a_k[a])
        if kind == A_NUM:
            if not self._num_side(u, self.a_t0[a], self.a_t1[a], t, &l):
                return False
            if self.a_op[a] == OP_EXISTS:
                return True
            if not self._num_side(u, self.a_t2[a], self.a_t3[a], t, &r):
                return False
            return cmp_v(self.a_op[a], l, r)
        if kind == A_TIME:
            if not self._time_lin(u, a, &A):
                return False
            return cmp_v(self.a_op[a], A + self.a_s[a] * t, <int64_t>0)
        if kind == A_TRAIT:
            return self.tbits[<int64_t>u * max(self.n_trait, 1) + f] != 0
        if kind == A_BUCKET:
            return self.a_t0[a] <= self.bucket[u] <= self.a_t1[a]
        if kind == A_IN:
            return self._member(u, f)
        if kind == A_MODE:
            A = self._mode_key(u, f, t)
            if A < 0:
                return False
            if self.a_op[a] == OP_EQ:
                return A == self.a_c[a]
            if self.a_op[a] == OP_NE:
                return A != self.a_c[a]
            return self.a_op[a] == OP_EXISTS
        if kind == A_SEQ:
            return self._seq_eval(u, f, t, &A)
        if kind == A_PRED:
            l = self.scores[<int64_t>u * self.n_score + self.a_t1[a]]
            if isnan(l) and not self._pred_value(u, self.a_t0[a], t, &l):
                return False
            if self.a_op[a] == OP_EXISTS:
                return True
            return cmp_v(self.a_op[a], l, self.a_k[a])
        if kind == A_ABANDON:
            ist = self._row(u) + self.f_ioff[f]
            if self.f_kind[f] == K_ABANDON:
                return ist[0] != INT64_MIN and ist[1] < ist[0] and \
                    ist[0] <= t - self.f_window[f]
            vec = &self.pools[<size_t>u * self.n_var + self.f_var[f]]
            for i in range(vec.size()):
                if vec[0][i].ts != INT64_MIN and vec[0][i].aux < vec[0][i].ts and \
                        vec[0][i].ts <= t - self.f_window[f]:
                    return True
            return False
        return False

    # ------------------------------------------------------------------ evaluation
    cdef void _eval(self, uint32_t u, int64_t t, const int32_t* segs, int nsegs,
                    int code=-1, uint64_t chg=0xFFFFFFFFFFFFFFFFULL) noexcept nogil:
        """Re-evaluate segments ``segs`` (in evaluation order) of user u at time t, buffer the
        flips, and reschedule u's timer.

        ``code`` >= 0 is the (clamped) code of the event just applied: only the wake-up
        candidates that event can have moved are recomputed, because ``wake[u]`` already
        bounds the others (they are unchanged since u's last evaluation, and no timer was due
        in between). ``code`` -1 recomputes them all (fresh users, re-evaluations).

        ``chg`` (with ``code``) says which of the code's listeners changed state
        (:meth:`_apply`): segments reading none of them are not re-evaluated, and when none
        changed no wake-up moved."""
        cdef int i
        cdef int64_t w, nxt
        cdef const int32_t* wf
        cdef const int32_t* wa
        cdef int nwf, nwa
        if self.fresh[u]:
            self.fresh[u] = 0
            segs = &self.all_segs[0]
            nsegs = self.n_seg
            code = -1
        if code >= 0 and chg != 0xFFFFFFFFFFFFFFFFULL:
            self._eval_segs(u, t, segs, nsegs, &self.es_mask[0] + self.es_start[code]
                            if self.es_mask.shape[0] else NULL, chg)
        else:
            self._eval_segs(u, t, segs, nsegs)
        if code >= 0 and chg == 0:
            nwf = nwa = 0
            wf = wa = NULL
        elif code < 0:
            wf, nwf = &self.time_feats[0] if self.time_feats.shape[0] else NULL, \
                self.time_feats.shape[0]
            wa, nwa = &self.time_atoms[0] if self.time_atoms.shape[0] else NULL, \
                self.time_atoms.shape[0]
        else:
            wf = &self.wf_list[0] + self.wf_start[code] if self.wf_list.shape[0] else NULL
            nwf = self.wf_start[code + 1] - self.wf_start[code]
            wa = &self.wa_list[0] + self.wa_start[code] if self.wa_list.shape[0] else NULL
            nwa = self.wa_start[code + 1] - self.wa_start[code]
        w = INT64_MAX
        for i in range(nwf):
            nxt = self._next_change(u, wf[i], t)
            if nxt < w:
                w = nxt
        for i in range(nwa):
            nxt = self._time_next_flip(u, wa[i], t)
            if nxt < w:
                w = nxt
        self._schedule(u, t, w)

    cdef void _eval_timer(self, uint32_t u, int64_t t) noexcept nogil:
        """u's timer fired at t: re-evaluate only the segments reading a time-dependent
        input that changes at t (and those referring to them with ``in()``).

        No event reached u since its last evaluation and nothing was due before t (the
        timer was the earliest of its wake-up candidates), so the inputs that change at t are
        exactly those whose next change after t - 1 is t; the next change of the others,
        computed from t - 1, is also their next change after t."""
        cdef int i, j, s, n = 0
        cdef int64_t w = INT64_MAX, nxt
        cdef uint8_t* mark = self.tmark.data()
        if self.fresh[u]:
            self._eval(u, t, &self.time_segs[0] if self.time_segs.shape[0] else NULL,
                       self.time_segs.shape[0])
            return
        for i in range(self.time_feats.shape[0]):
            nxt = self._next_change(u, self.time_feats[i], t - 1)
            if nxt <= t:
                for j in range(self.tf_start[i], self.tf_start[i + 1]):
                    mark[self.tf_segs[j]] = 1
                nxt = self._next_change(u, self.time_feats[i], t)
            if nxt < w:
                w = nxt
        for i in range(self.time_atoms.shape[0]):
            nxt = self._time_next_flip(u, self.time_atoms[i], t - 1)
            if nxt <= t:
                for j in range(self.ta_start[i], self.ta_start[i + 1]):
                    mark[self.ta_segs[j]] = 1
                nxt = self._time_next_flip(u, self.time_atoms[i], t)
            if nxt < w:
                w = nxt
        for j in range(self.pred_segs.shape[0]):
            mark[self.pred_segs[j]] = 1
        self.tsegs.clear()
        for i in range(self.time_segs.shape[0]):
            s = self.time_segs[i]
            if mark[s]:
                mark[s] = 0
                self.tsegs.push_back(s)
        self._eval_segs(u, t, self.tsegs.data(), self.tsegs.size())
        self._schedule(u, t, w)

    cdef void _eval_segs(self, uint32_t u, int64_t t, const int32_t* segs, int nsegs,
                         const uint64_t* masks=NULL, uint64_t chg=0) noexcept nogil:
        """Evaluate segments ``segs`` of u at t, buffer the flips, update the timed items;
        with ``masks``, only those whose mask meets ``chg``."""
        cdef uint8_t st[STACK]
        cdef int sp, s, i, j, op
        cdef uint8_t* mem = self.members + <int64_t>u * self.mstride
        cdef uint8_t r
        for j in range(nsegs):
            if masks != NULL and not (masks[j] & chg):
                continue
            self.n_evals += 1
            s = segs[j]
            sp = 0
            for i in range(self.p_start[s], self.p_start[s + 1]):
                op = self.p_op[i]
                if op == P_ATOM:
                    st[sp] = self._atom(u, self.p_arg[i], t)
                    sp += 1
                elif op == P_AND:
                    sp -= 1
                    st[sp - 1] = st[sp - 1] and st[sp]
                elif op == P_OR:
                    sp -= 1
                    st[sp - 1] = st[sp - 1] or st[sp]
                else:
                    st[sp - 1] = not st[sp - 1]
            r = st[0] != 0
            if r != ((mem[s >> 3] >> (s & 7)) & 1):
                mem[s >> 3] ^= <uint8_t>(1 << (s & 7))
                self.tr_u.push_back(u)
                self.tr_s.push_back(s)
                self.tr_e.push_back(r)
                self.tr_t.push_back(t)
                if self.n_items:
                    self.flipdir[s] = 1 if r else -1
                    self.flipped.push_back(s)
        if self.n_items:
            self._items(u, t)

    cdef void _schedule(self, uint32_t u, int64_t t, int64_t w) noexcept nogil:
        """Fold the predictive crossings and the timed items' deadlines into u's wake-up
        ``w`` (the time features' and age tests' part) and push it if it moved earlier."""
        cdef int i
        cdef int64_t nxt
        for i in range(self.n_patom):
            nxt = self._pred_next(u, self.pred_atoms[i], t)
            if nxt < w:
                w = nxt
        for i in range(self.n_items):
            nxt = self.dead[<int64_t>u * self.n_items + i]
            if nxt < w:
                w = nxt
        # Push only when the wake-up moves earlier: a timer that fires too early re-evaluates
        # (finding nothing) and reschedules, which costs less than a heap push per event.
        if w < self.wake[u]:
            self.wake[u] = w
            self._timer_push(w, u)
            if self.heap.size() + self.n_wheel + self.over.size() > \
                    2 * <size_t>self.n_users + 1024:
                self._rebuild_heap()

    cdef void _items(self, uint32_t u, int64_t t) noexcept nogil:
        """Update u's pending firings and journey positions from this evaluation's flips, then
        emit those due now (docs/triggers.md), item by item in registration order."""
        cdef int i, j, x, k
        cdef int8_t fd
        cdef uint8_t flag
        cdef bint leave
        cdef int64_t* d
        cdef int32_t* p
        cdef int64_t base = <int64_t>u * self.n_items
        for i in range(self.n_items):
            d = self.dead + base + i
            p = self.jpos + base + i
            fd = self.flipdir[self.it_seg[i]]
            if self.it_kind[i] == 0:
                if fd != 0:
                    if (fd == 1) == (self.it_enter[i] != 0):
                        d[0] = t + self.it_delay[i]
                    else:
                        d[0] = INT64_MAX          # left (or came back) before the delay
            else:
                if p[0] < 0 and fd == 1 and self.it_send[i] > self.it_sstart[i]:
                    p[0] = 0
                    d[0] = t + self.st_delay[self.it_sstart[i]]
                if p[0] >= 0:
                    leave = fd == -1
                    for x in range(self.it_xstart[i], self.it_xend[i]):
                        if self.flipdir[self.ex_seg[x]] == 1:
                            leave = True
                    if leave:
                        p[0] = -1
                        d[0] = INT64_MAX
        for j in range(self.flipped.size()):
            self.flipdir[self.flipped[j]] = 0
        self.flipped.clear()
        for i in range(self.n_items):
            d = self.dead + base + i
            p = self.jpos + base + i
            while d[0] <= t:
                self.fi_item.push_back(i)
                self.fi_u.push_back(u)
                self.fi_t.push_back(t)
                if self.it_kind[i] == 0:
                    self.fi_step.push_back(-1)
                    self.fi_flag.push_back(1)
                    d[0] = INT64_MAX
                else:
                    k = self.it_sstart[i] + p[0]
                    self.fi_step.push_back(p[0])
                    flag = 1 if self.st_onlyif[k] < 0 or self._member(u, self.st_onlyif[k]) \
                        else 0
                    self.fi_flag.push_back(flag)
                    p[0] += 1
                    if self.it_sstart[i] + p[0] < self.it_send[i]:
                        d[0] = t + self.st_delay[k + 1]
                    else:
                        p[0] = -1
                        d[0] = INT64_MAX

    def take_firings(self):
        """Drain the firing buffer: (item, user idx, ts, journey step or -1, only_if held)."""
        cdef Py_ssize_t n = self.fi_u.size(), i
        it = np.empty(n, dtype=np.int32)
        u = np.empty(n, dtype=np.uint32)
        t = np.empty(n, dtype=np.int64)
        st = np.empty(n, dtype=np.int32)
        fl = np.empty(n, dtype=np.bool_)
        cdef int32_t[::1] mit = it
        cdef uint32_t[::1] mu = u
        cdef int64_t[::1] mt = t
        cdef int32_t[::1] mst = st
        cdef uint8_t[::1] mfl = fl.view(np.uint8)
        for i in range(n):
            mit[i] = self.fi_item[i]
            mu[i] = self.fi_u[i]
            mt[i] = self.fi_t[i]
            mst[i] = self.fi_step[i]
            mfl[i] = self.fi_flag[i]
        self.fi_item.clear()
        self.fi_u.clear()
        self.fi_t.clear()
        self.fi_step.clear()
        self.fi_flag.clear()
        return it, u, t, st, fl

    @property
    def pending_firings(self):
        return self.fi_u.size()

    def item_state(self, uint32_t u):
        """(deadline, journey position) of each timed item for user u."""
        if u >= self.n_users:
            raise ValueError("item_state: user index out of range")
        cdef int64_t b = <int64_t>u * self.n_items
        return (self._dead[b: b + self.n_items].copy(), self._jpos[b: b + self.n_items].copy())

    cdef inline void _timer_push(self, int64_t t, int64_t u) noexcept nogil:
        cdef int64_t b
        if t < self.horizon:
            self.heap.push_back(HeapItem(-t, -u))
            push_heap(self.heap.begin(), self.heap.end())
            return
        b = t >> WHEEL_BITS
        if b - (self.horizon >> WHEEL_BITS) < WHEEL_N:
            self.wheel[b & (WHEEL_N - 1)].push_back(HeapItem(-t, -u))
            self.n_wheel += 1
        else:
            self.over.push_back(HeapItem(-t, -u))
            push_heap(self.over.begin(), self.over.end())

    cdef void _timers_from_over(self) noexcept nogil:
        """Move the overflow entries now within the wheel's reach into the wheel."""
        cdef int64_t t
        while self.over.size():
            t = -self.over.front().first
            if (t >> WHEEL_BITS) - (self.horizon >> WHEEL_BITS) >= WHEEL_N:
                break
            self._timer_push(t, -self.over.front().second)
            pop_heap(self.over.begin(), self.over.end())
            self.over.pop_back()

    cdef bint _timers_upto(self, int64_t t) noexcept nogil:
        """Move the horizon one step towards ``t`` (bringing the next bucket's entries into
        the heap); False once every entry due at or before ``t`` is in the heap."""
        cdef vector[HeapItem]* bk
        cdef size_t i
        if t < self.horizon:
            return False
        if self.n_wheel == 0:
            if self.over.empty() or -self.over.front().first > t:
                # nothing is due up to t: jump past it
                self.horizon = ((t >> WHEEL_BITS) + 1) << WHEEL_BITS
                self._timers_from_over()
                return False
            self.horizon = (-self.over.front().first >> WHEEL_BITS) << WHEEL_BITS
            self._timers_from_over()
        bk = &self.wheel[(self.horizon >> WHEEL_BITS) & (WHEEL_N - 1)]
        for i in range(bk.size()):
            self.heap.push_back(bk[0][i])
            push_heap(self.heap.begin(), self.heap.end())
        self.n_wheel -= bk.size()
        vector[HeapItem]().swap(bk[0])      # give the bucket's memory back
        self.horizon += (<int64_t>1) << WHEEL_BITS
        if self.over.size():
            self._timers_from_over()
        return True

    cdef void _rebuild_heap(self) noexcept nogil:
        cdef int64_t u
        cdef size_t i
        self.heap.clear()
        self.over.clear()
        for i in range(self.wheel.size()):
            vector[HeapItem]().swap(self.wheel[i])
        self.n_wheel = 0
        for u in range(self.n_users):
            if self.wake[u] != INT64_MAX:
                self._timer_push(self.wake[u], u)

    cdef void _advance(self, int64_t t) noexcept nogil:
        cdef int64_t tt
        cdef uint32_t u, nu
        while True:
            while self.heap.size():
                tt = -self.heap.front().first
                if tt > t:
                    break
                u = <uint32_t>(-self.heap.front().second)
                pop_heap(self.heap.begin(), self.heap.end())
                self.heap.pop_back()
                if self.heap.size():        # the next timer's user, while this one runs
                    nu = <uint32_t>(-self.heap.front().second)
                    SEGCORE_PREFETCH(self._row_addr(nu))
                    SEGCORE_PREFETCH(self.wake + nu)
                if self.wake[u] != tt:
                    continue
                self.wake[u] = INT64_MAX
                self.n_fired += 1
                if tt > self.now:
                    self.now = tt
                self._eval_timer(u, tt)
            if not self._timers_upto(t):
                break
        if t > self.now:
            self.now = t

    # ------------------------------------------------------------------ public
    def track(self, const uint32_t[::1] uidx not None, const int32_t[::1] ecode not None,
              const int64_t[::1] ts not None, const uint8_t[::1] fpass not None,
              const double[::1] vals not None, const int64_t[::1] keys not None,
              const int64_t[::1] clock=None):
        """Apply events in order (row-major ``fpass``/``vals``/``keys`` with n_filter/n_val/
        n_key columns). Returns the number of transitions now buffered.

        ``clock`` (optional, one per row) is the time to move to before applying the row when
        it is later than the row's ``ts`` (a shard applying its part of a batch at the batch's
        running time)."""
        cdef Py_ssize_t n = uidx.shape[0]
        cdef Py_ssize_t i
        cdef int nf = self.n_filter, nv = self.n_val, nk = self.n_key
        cdef const uint8_t* fp = NULL
        cdef const double* vp = NULL
        cdef const int64_t* kp = NULL
        if ecode.shape[0] != n or ts.shape[0] != n or (clock is not None and
                                                       clock.shape[0] != n):
            raise ValueError("track: columns differ in length")
        cdef const int64_t* ck = NULL
        if clock is not None and n:
            ck = &clock[0]
            for i in range(n):
                if ck[i] >= (<int64_t>1 << 48):
                    raise ValueError(f"track: clock {ck[i]} out of range")
        if fpass.shape[0] != n * nf or vals.shape[0] != n * nv or keys.shape[0] != n * nk:
            raise ValueError("track: property columns have the wrong size")
        cdef int64_t tmax = -1
        for i in range(n):
            if uidx[i] >= self.n_users:
                raise ValueError(f"track: user index {uidx[i]} out of range")
            if ts[i] < 0 or ts[i] >= (<int64_t>1 << 48):
                raise ValueError(f"track: ts {ts[i]} out of range")
            if ecode[i] < 0:
                raise ValueError("track: negative event code")
        if self.packed:
            for i in range(n):
                tmax = max(tmax, ts[i])
            self._admit_ts(tmax)
        cdef uint32_t pu
        with nogil:
            for i in range(n):
                if i + DEF_PREFETCH < n:
                    pu = uidx[i + DEF_PREFETCH]
                    SEGCORE_PREFETCH(self._row_addr(pu))
                    SEGCORE_PREFETCH(self.members + <int64_t>pu * self.mstride)
                    SEGCORE_PREFETCH(self.wake + pu)
                if ck != NULL and ck[i] > self.now:
                    self._advance(ck[i])        # (then _one's advance to ts, if later: the
                if nf:                          # same timers fire as in the other order)
                    fp = &fpass[i * nf]
                if nv:
                    vp = &vals[i * nv]
                if nk:
                    kp = &keys[i * nk]
                self._one(uidx[i], ecode[i], ts[i], fp, vp, kp)
        return self.tr_u.size()

    def track_one(self, uint32_t u, int32_t e, int64_t ts, const uint8_t[::1] fpass not None,
                  const double[::1] vals not None, const int64_t[::1] keys not None):
        """One event: same contract as :meth:`track`, with the row's property columns as
        1-d buffers."""
        if u >= self.n_users:
            raise ValueError(f"track_one: user index {u} out of range")
        if ts < 0 or ts >= (<int64_t>1 << 48) or e < 0:
            raise ValueError("track_one: bad event code or ts")
        self._admit_ts(ts)
        if fpass.shape[0] < self.n_filter or vals.shape[0] < self.n_val or \
                keys.shape[0] < self.n_key:
            raise ValueError("track_one: property columns have the wrong size")
        # (no GIL release: it would cost more than one event's work)
        self._one(u, e, ts, &fpass[0] if self.n_filter else NULL,
                  &vals[0] if self.n_val else NULL, &keys[0] if self.n_key else NULL)
        return self.tr_u.size()

    cdef inline void _prefetch_user(self, uint32_t u) noexcept nogil:
        """Start fetching every cache line of a user's hot state (its counter row, float row,
        membership bits and wake-up), so that the misses overlap instead of queueing."""
        cdef const char* p = self._row_addr(u)
        cdef int64_t i, nb = self.prow if self.packed else self.istride * 8
        for i in range(0, nb, 64):
            SEGCORE_PREFETCH(p + i)
        if nb:
            SEGCORE_PREFETCH(p + nb - 1)
        p = <const char*>(self.fstate + <int64_t>u * self.fstride)
        for i in range(0, self.fstride * 8, 64):
            SEGCORE_PREFETCH(p + i)
        SEGCORE_PREFETCH(self.members + <int64_t>u * self.mstride)
        SEGCORE_PREFETCH(self.wake + u)

    cdef inline void _one(self, uint32_t u, int32_t e, int64_t ts, const uint8_t* fp,
                          const double* vp, const int64_t* kp) noexcept nogil:
        """One checked event (u < n_users, 0 <= ts < 2**48, e >= 0, full-width rows)."""
        cdef int32_t c
        cdef uint64_t chg
        if ts > self.now:
            self._advance(ts)
        chg = self._apply(u, e, ts, fp, vp, kp)
        c = e if e < self.n_codes else self.n_codes
        self._eval(u, self.now, &self.es_list[0] + self.es_start[c]
                   if self.es_list.shape[0] else NULL,
                   self.es_start[c + 1] - self.es_start[c], c, chg)

    def advance(self, int64_t t):
        """Move time to ``t`` (no-op if not later than now), firing every due timer in order."""
        if t >= (<int64_t>1 << 48):
            raise ValueError("advance: time out of range")
        with nogil:
            self._advance(t)
        return self.tr_u.size()

    def eval_users(self, const uint32_t[::1] uidx not None):
        """Re-evaluate the given users at ``now`` (after traits or scores changed)."""
        cdef Py_ssize_t i
        for i in range(uidx.shape[0]):
            if uidx[i] >= self.n_users:
                raise ValueError("eval_users: user index out of range")
        with nogil:
            for i in range(uidx.shape[0]):
                if self.bucket[uidx[i]] >= 0:         # (not a forgotten user's slot)
                    self._eval(uidx[i], self.now, &self.all_segs[0], self.n_seg)
        return self.tr_u.size()

    def eval_all(self):
        """Re-evaluate every user at ``now`` and rebuild the timer heap."""
        cdef int64_t u
        with nogil:
            for u in range(self.n_users):
                self.wake[u] = INT64_MAX
                if self.bucket[u] >= 0:               # (not a forgotten user's slot)
                    self._eval(<uint32_t>u, self.now, &self.all_segs[0], self.n_seg)
            self._rebuild_heap()
        return self.tr_u.size()

    def set_trait_bits(self, const uint32_t[::1] uidx not None,
                       const uint8_t[::1] bits not None):
        cdef Py_ssize_t i, j
        cdef int nt = self.n_trait
        if bits.shape[0] != uidx.shape[0] * nt:
            raise ValueError("set_trait_bits: wrong size")
        for i in range(uidx.shape[0]):
            if uidx[i] >= self.n_users:
                raise ValueError("set_trait_bits: user index out of range")
        for i in range(uidx.shape[0]):
            for j in range(nt):
                self.tbits[<int64_t>uidx[i] * nt + j] = bits[i * nt + j]

    def set_scores(self, const uint32_t[::1] uidx not None, const double[::1] values not None):
        """Set every score of the given users (row-major, n_score columns, NaN = missing)."""
        cdef Py_ssize_t i, j
        cdef int ns = self.n_score
        if values.shape[0] != uidx.shape[0] * ns:
            raise ValueError("set_scores: wrong size")
        for i in range(uidx.shape[0]):
            if uidx[i] >= self.n_users:
                raise ValueError("set_scores: user index out of range")
        for i in range(uidx.shape[0]):
            for j in range(ns):
                self.scores[<int64_t>uidx[i] * ns + j] = values[i * ns + j]
            self._pred_forget_crossings(uidx[i])

    # ------------------------------------------------------------------ predictive (Python side)
    def set_pred_params(self, const double[::1] params not None):
        """Set the predictive parameters (NaN = that model is not fitted): r, alpha, a, b,
        p, q, v, horizon in days, then the logistic coefficients (intercept first). The
        caller re-evaluates (eval_all)."""
        cdef int i
        if params.shape[0] > N_PP:
            raise ValueError("set_pred_params: too many parameters")
        for i in range(N_PP):
            self.pp[i] = params[i] if i < params.shape[0] else NAN
        for i in range(self.n_users * self.n_patom):
            self.pcache[i] = INT64_MIN

    def pred_params(self):
        return np.array([self.pp[i] for i in range(N_PP)], dtype=np.float64)

    def pred_stats(self):
        """Per user: (purchases, first purchase ts, last purchase ts, amount of the first,
        sum of amounts, purchases with an amount) as numpy arrays."""
        if self.pred_f < 0:
            raise ValueError("pred_stats: the plan keeps no predictive state")
        n = self.n_users
        ist = self._istate[: n * self.istride].reshape(n, max(self.istride, 1)) \
            if self.istride else np.zeros((n, 1), np.int64)
        fst = self._fstate[: n * self.fstride].reshape(n, max(self.fstride, 1))
        io, fo = self.f_ioff[self.pred_f], self.f_foff[self.pred_f]
        return (fst[:, fo].copy(), ist[:, io].copy(), ist[:, io + 1].copy(),
                fst[:, fo + 1].copy(), fst[:, fo + 2].copy(), fst[:, fo + 3].copy())

    def pred_features(self, int64_t day):
        """score.convert's features of every user on ``day`` (UTC days since the epoch):
        an (n_users, n_conv + 2) float array and a uint8 mask of users with an event in the
        7 days up to it."""
        if self.pred_f < 0:
            raise ValueError("pred_features: the plan keeps no predictive state")
        cdef int64_t n = self.n_users, u
        cdef int k = self.n_conv + 2, j
        X = np.zeros((n, k), dtype=np.float64)
        ok = np.zeros(n, dtype=np.uint8)
        cdef double[:, ::1] mx = X
        cdef uint8_t[::1] mo = ok
        cdef double buf[10]
        for u in range(n):
            if self._conv_features(<uint32_t>u, day, buf):
                mo[u] = 1
                for j in range(k):
                    mx[u, j] = buf[j]
        return X, ok

    def pred_scores_of(self, const uint32_t[::1] uidx not None, int64_t t):
        """Like :meth:`pred_scores` for the given users only."""
        cdef Py_ssize_t i
        cdef int sid
        cdef double v
        out = np.full((uidx.shape[0], 5), np.nan, dtype=np.float64)
        cdef double[:, ::1] mo = out
        for i in range(uidx.shape[0]):
            if uidx[i] >= self.n_users:
                raise ValueError("pred_scores_of: user index out of range")
        if self.pred_f < 0:
            return out
        for i in range(uidx.shape[0]):
            for sid in range(5):
                if self._pred_value(uidx[i], sid, t, &v):
                    mo[i, sid] = v
        return out

    def pred_scores(self, int64_t t):
        """The models' scores (p_alive, churn, expected, ltv, convert) of every user at t,
        NaN where missing; callers' set_scores values are not applied."""
        return self.pred_scores_of(np.arange(self.n_users, dtype=np.uint32), t)

    def copy_features_from(self, Kernel src not None, const int32_t[::1] dst_f not None,
                           const int32_t[::1] src_f not None):
        """Copy the per-user state of features ``src_f`` of ``src`` into features ``dst_f`` of
        this kernel, for every user (same users, same dense order; same feature specs)."""
        cdef int64_t u, j
        cdef Py_ssize_t i
        cdef int f, g
        if dst_f.shape[0] != src_f.shape[0] or src.n_users != self.n_users:
            raise ValueError("copy_features_from: mismatched features or users")
        self.sc_valid = False
        for i in range(dst_f.shape[0]):
            f, g = dst_f[i], src_f[i]
            if not (0 <= f < self.n_feat and 0 <= g < src.n_feat) or \
                    self.f_kind[f] != src.f_kind[g] or \
                    (self.f_kind[f] == K_TOPK and src.f_k[g] < self.f_k[f]):
                raise ValueError("copy_features_from: incompatible features")
        self._copy_counters(src, dst_f, src_f)
        for i in range(dst_f.shape[0]):
            f, g = dst_f[i], src_f[i]
            for u in range(self.n_users):
                for j in range(self._fsize(f)):
                    self.fstate[u * self.fstride + self.f_foff[f] + j] = \
                        src.fstate[u * src.fstride + src.f_foff[g] + j]
                if self.f_var[f] >= 0:
                    self.pools[<size_t>u * self.n_var + self.f_var[f]] = \
                        src.pools[<size_t>u * src.n_var + src.f_var[g]]

    cdef void _copy_counters(self, Kernel src, const int32_t[::1] dst_f,
                             const int32_t[::1] src_f) except *:
        """Copy the counters of features ``src_f`` of ``src`` into features ``dst_f``, for
        every user (row by row, decoded, so that either kernel may have packed rows)."""
        cdef int64_t u, j
        cdef Py_ssize_t i
        cdef int f, g
        cdef vector[int64_t] drow, srow
        if not self.istride:
            return
        drow.resize(self.istride)
        srow.resize(max(src.istride, 1))
        for u in range(self.n_users):
            self._load_row(u, drow.data())
            src._load_row(u, srow.data())
            for i in range(dst_f.shape[0]):
                f, g = dst_f[i], src_f[i]
                for j in range(self._isize(f)):
                    drow[self.f_ioff[f] + j] = srow[src.f_ioff[g] + j]
            self._store_row(u, drow.data())

    def merge_into(self, uint32_t dst, uint32_t src):
        """Fold user ``src``'s feature state into ``dst`` as if ``dst`` had received all of
        ``src``'s events (the caller then forgets ``src`` and re-evaluates ``dst``).

        Exact for counts, windows, first/last timestamps, distinct sets and carts; an all-time
        float sum becomes the sum of the two sums."""
        cdef int f, kind, k, i, j, a, b
        cdef int64_t* d
        cdef int64_t* s
        cdef double* fd
        cdef double* fs
        cdef vector[Entry]* vd
        cdef vector[Entry]* vs
        cdef vector[int64_t] slots
        cdef size_t x, y
        cdef int64_t off
        cdef bint found
        cdef vector[int64_t] drow, srow
        if dst >= self.n_users or src >= self.n_users or dst == src:
            raise ValueError("merge_into: bad user indices")
        self.sc_valid = False
        drow.resize(max(self.istride, 1))
        srow.resize(max(self.istride, 1))
        self._load_row(dst, drow.data())
        self._load_row(src, srow.data())
        for f in range(self.n_feat):
            kind = self.f_kind[f]
            d = drow.data() + self.f_ioff[f]
            s = srow.data() + self.f_ioff[f]
            fd = self.fstate + <int64_t>dst * self.fstride + self.f_foff[f]
            fs = self.fstate + <int64_t>src * self.fstride + self.f_foff[f]
            if self.f_var[f] >= 0:
                vd = &self.pools[<size_t>dst * self.n_var + self.f_var[f]]
                vs = &self.pools[<size_t>src * self.n_var + self.f_var[f]]
            if kind == K_TOPK:
                # the K latest of both (slots sorted descending)
                k = self.f_k[f]
                slots.clear()
                a = 0
                b = 0
                while <int>slots.size() < k:
                    if a < k and (b >= k or d[a] >= s[b]):
                        slots.push_back(d[a])
                        a += 1
                    else:
                        slots.push_back(s[b])
                        b += 1
                for i in range(k):
                    d[i] = slots[i]
            elif kind == K_COUNT:
                d[0] += s[0]
            elif kind == K_SUM:
                fd[0] += fs[0]
            elif kind == K_STATS:
                if s[0]:
                    if d[0] == 0:
                        fd[1] = fs[1]
                        fd[2] = fs[2]
                    else:
                        if fs[1] < fd[1]:
                            fd[1] = fs[1]
                        if fs[2] > fd[2]:
                            fd[2] = fs[2]
                    d[0] += s[0]
                    fd[0] += fs[0]
            elif kind == K_FIRST:
                if s[0] < d[0]:
                    d[0] = s[0]
            elif kind == K_LAST:
                if s[0] > d[0]:
                    d[0] = s[0]
            elif kind == K_ABANDON:
                if s[0] > d[0]:
                    d[0] = s[0]
                if s[1] > d[1]:
                    d[1] = s[1]
            elif kind == K_WLIST or kind == K_SEQ:
                for x in range(vs.size()):          # keep (ts) order; src after dst on ties
                    insert_by_ts(vd, vs[0][x])
                while kind == K_SEQ and <int64_t>vd.size() > self.seq_cap:
                    vd.erase(vd.begin())
                    self.seq_evicted += 1
            elif kind == K_DISTINCT:
                for x in range(vs.size()):
                    found = False
                    y = 0
                    while y < vd.size() and vd[0][y].key <= vs[0][x].key:
                        if vd[0][y].key == vs[0][x].key:
                            found = True
                            break
                        y += 1
                    if not found:
                        vd.insert(vd.begin() + y, vs[0][x])
            elif kind == K_ABANDON_BY:
                for x in range(vs.size()):
                    found = False
                    for y in range(vd.size()):
                        if vd[0][y].key == vs[0][x].key:
                            if vs[0][x].ts > vd[0][y].ts:
                                vd[0][y].ts = vs[0][x].ts
                            if vs[0][x].aux > vd[0][y].aux:
                                vd[0][y].aux = vs[0][x].aux
                            found = True
                            break
                    if not found:
                        vd.push_back(vs[0][x])
            elif kind == K_MODE:
                # src's events count as arriving after dst's: its stamps follow dst's
                off = 0
                for y in range(vd.size()):
                    off += vd[0][y].aux
                for x in range(vs.size()):
                    found = False
                    for y in range(vd.size()):
                        if vd[0][y].key == vs[0][x].key:
                            vd[0][y].aux += vs[0][x].aux
                            if vs[0][x].ts >= vd[0][y].ts:
                                vd[0][y].ts = vs[0][x].ts
                                vd[0][y].val = vs[0][x].val + <double>off
                            found = True
                            break
                    if not found:
                        y = key_lower_bound(vd, vs[0][x].key)
                        vd.insert(vd.begin() + y, vs[0][x])
                        vd[0][y].val += <double>off
            elif kind == K_PRED:
                # src's purchases count as arriving after dst's (dst keeps a tied first)
                if s[0] < d[0]:
                    d[0] = s[0]
                    fd[1] = fs[1]
                if s[1] > d[1]:
                    d[1] = s[1]
                fd[0] += fs[0]
                fd[2] += fs[2]
                fd[3] += fs[3]
                if s[2] != INT64_MIN:
                    self._ring_advance(d, s[2])
                    for off in range(s[2] - RING_DAYS + 1, s[2] + 1):
                        if off <= d[2] - RING_DAYS:
                            continue
                        for k in range(self.n_conv + 1):
                            self._ring_add(<uint64_t*>(d + 3), off, k,
                                           self._ring_get(<uint64_t*>(s + 3), off, k))
                self._pred_forget_crossings(dst)
            elif kind == K_SESS:
                # the sessions of the union of both users' events
                self.scratch.assign(vd.begin(), vd.end())
                for x in range(vs.size()):
                    self.scratch.push_back(vs[0][x])
                sort(self.scratch.begin(), self.scratch.end(), entry_ts_less)
                vd.clear()
                for x in range(self.scratch.size()):
                    y = vd.size()
                    if y and self.scratch[x].ts - vd[0][y - 1].aux < self.f_span[f]:
                        if self.scratch[x].aux > vd[0][y - 1].aux:
                            vd[0][y - 1].aux = self.scratch[x].aux
                        vd[0][y - 1].key += self.scratch[x].key
                    else:
                        vd.push_back(self.scratch[x])
        if self.istride:
            self._store_row(dst, drow.data())

    def take_evicted(self):
        """The number of seq events evicted (docs/patterns.md) since the last call."""
        n = self.seq_evicted
        self.seq_evicted = 0
        return n

    def forget(self, uint32_t u):
        """Erase user u's state: counters, windows, memberships, traits, scores, timers,
        pending firings. The slot stays allocated but holds nothing of the user."""
        cdef int64_t j
        if u >= self.n_users:
            raise ValueError("forget: user index out of range")
        self.sc_valid = False
        if self.istride:
            self._store_row(u, self.iinit)
        for j in range(self.fstride):
            self.fstate[<int64_t>u * self.fstride + j] = self.frow_init[j]
        for j in range(self.n_var):
            vector[Entry]().swap(self.pools[<size_t>u * self.n_var + j])
        for j in range(self.mstride):
            self.members[<int64_t>u * self.mstride + j] = 0
        for j in range(self.n_trait):
            self.tbits[<int64_t>u * self.n_trait + j] = 0
        for j in range(self.n_score):
            self.scores[<int64_t>u * self.n_score + j] = NAN
        for j in range(self.n_items):
            self.dead[<int64_t>u * self.n_items + j] = INT64_MAX
            self.jpos[<int64_t>u * self.n_items + j] = -1
        self._pred_forget_crossings(u)
        self.wake[u] = INT64_MAX          # its heap entries are now stale
        self.bucket[u] = -1               # marks the slot erased: eval_all/eval_users skip it
        self.fresh[u] = 0

    def set_now(self, int64_t t):
        if t < self.now:
            raise ValueError("set_now: time cannot move backwards")
        self.now = t

    def take_transitions(self):
        """Drain the transition buffer: (user idx uint32, segment int32, entered bool, ts int64)."""
        cdef Py_ssize_t n = self.tr_u.size()
        cdef Py_ssize_t i
        u = np.empty(n, dtype=np.uint32)
        s = np.empty(n, dtype=np.int32)
        e = np.empty(n, dtype=np.bool_)
        t = np.empty(n, dtype=np.int64)
        cdef uint32_t[::1] mu = u
        cdef int32_t[::1] ms = s
        cdef uint8_t[::1] me = e.view(np.uint8)
        cdef int64_t[::1] mt = t
        for i in range(n):
            mu[i] = self.tr_u[i]
            ms[i] = self.tr_s[i]
            me[i] = self.tr_e[i]
            mt[i] = self.tr_t[i]
        self._clear_transitions()
        return u, s, e, t

    cdef inline void _clear_transitions(self) noexcept nogil:
        self.tr_u.clear()
        self.tr_s.clear()
        self.tr_e.clear()
        self.tr_t.clear()

    def take_transitions_list(self):
        """Drain the transition buffer as a list of (user idx, segment, entered, ts) tuples
        (cheaper than arrays for the few transitions of a single event)."""
        cdef Py_ssize_t i, n = self.tr_u.size()
        out = [(self.tr_u[i], self.tr_s[i], self.tr_e[i] != 0, self.tr_t[i]) for i in range(n)]
        self._clear_transitions()
        return out

    cdef inline bint _member(self, uint32_t u, int s) noexcept nogil:
        return (self.members[<int64_t>u * self.mstride + (s >> 3)] >> (s & 7)) & 1

    def _member_bytes(self, int64_t n):
        """The first n users' flags, one byte per (user, segment) (the snapshot layout)."""
        cdef int64_t nseg1 = max(self.n_seg, 1)
        if not n:
            return np.zeros(0, dtype=np.uint8)
        bits = np.unpackbits(self._members[: n * self.mstride].reshape(n, self.mstride),
                             axis=1, bitorder="little")[:, :nseg1]
        return np.ascontiguousarray(bits).reshape(-1)

    def member_row(self, uint32_t u):
        """Membership flags of user ``u`` in segment (plan) order."""
        if u >= self.n_users:
            raise ValueError("member_row: user index out of range")
        cdef int64_t ms = self.mstride
        return np.unpackbits(self._members[u * ms: u * ms + ms],
                             bitorder="little")[: self.n_seg].astype(bool)

    def member_bits(self, const uint32_t[::1] uidx not None, const int32_t[::1] seg not None):
        """Current membership flag of each (user, segment) pair."""
        cdef Py_ssize_t n = uidx.shape[0], i
        if seg.shape[0] != n:
            raise ValueError("member_bits: columns differ in length")
        for i in range(n):
            if uidx[i] >= self.n_users or not 0 <= seg[i] < self.n_seg:
                raise ValueError("member_bits: index out of range")
        out = np.empty(n, dtype=np.bool_)
        cdef uint8_t[::1] mo = out.view(np.uint8)
        for i in range(n):
            mo[i] = self._member(uidx[i], seg[i])
        return out

    def migrate_from(self, Kernel old not None, const int32_t[::1] fmap not None,
                     const int32_t[::1] smap not None, imap=None):
        """Take over users, time and the state of features/segments that survive a plan change.

        ``fmap[f]`` is the old feature index for new feature ``f`` (or -1: starts empty);
        ``smap[s]`` likewise for segments. The old kernel is left empty.
        """
        cdef int64_t u, j, n = old.n_users
        cdef int f, fo, s, so, k, i
        if fmap.shape[0] != self.n_feat or smap.shape[0] != self.n_seg:
            raise ValueError("migrate_from: map sizes do not match the plan")
        for f in range(self.n_feat):
            fo = fmap[f]
            if fo < 0:
                continue
            if fo >= old.n_feat or old.f_kind[fo] != self.f_kind[f] or \
                    (self.f_kind[f] == K_TOPK and old.f_k[fo] < self.f_k[f]):
                raise ValueError("migrate_from: incompatible feature map")
        for s in range(self.n_seg):
            if smap[s] >= old.n_seg:
                raise ValueError("migrate_from: segment map out of range")
        if self.n_users:
            raise ValueError("migrate_from: target kernel is not empty")
        cdef int32_t[::1] im = np.full(self.n_items, -1, np.int32) if imap is None else \
            np.ascontiguousarray(imap, dtype=np.int32)
        if im.shape[0] != self.n_items:
            raise ValueError("migrate_from: item map size does not match the plan")
        for i in range(self.n_items):
            if im[i] >= old.n_items:
                raise ValueError("migrate_from: item map out of range")
        self.add_users(n, np.ascontiguousarray(old._bucket[:n]))
        self.now = old.now
        kept = np.flatnonzero(np.asarray(fmap) >= 0).astype(np.int32)
        self._copy_counters(old, kept, np.asarray(fmap)[kept])
        for u in range(n):
            for f in range(self.n_feat):
                fo = fmap[f]
                if fo < 0:
                    continue
                for j in range(self._fsize(f)):
                    self.fstate[u * self.fstride + self.f_foff[f] + j] = \
                        old.fstate[u * old.fstride + old.f_foff[fo] + j]
                if self.f_var[f] >= 0:
                    self.pools[<size_t>u * self.n_var + self.f_var[f]].swap(
                        old.pools[<size_t>u * old.n_var + old.f_var[fo]])
            for s in range(self.n_seg):
                so = smap[s]
                if so >= 0 and old._member(u, so):
                    self.members[u * self.mstride + (s >> 3)] |= <uint8_t>(1 << (s & 7))
            self.fresh[u] = old.fresh[u]
            for i in range(self.n_items):
                if im[i] >= 0:
                    self.dead[u * self.n_items + i] = old.dead[u * old.n_items + im[i]]
                    self.jpos[u * self.n_items + i] = old.jpos[u * old.n_items + im[i]]

    def export_state(self):
        """Every per-user array and the time, as numpy copies (for snapshots)."""
        cdef int64_t n = self.n_users, u, i, m
        cdef size_t total = 0
        cdef Py_ssize_t j
        for j in range(<Py_ssize_t>(n * self.n_var)):
            total += self.pools[j].size()
        counts = np.zeros(n * self.n_var, dtype=np.int64)
        pts = np.empty(total, dtype=np.int64)
        pval = np.empty(total, dtype=np.float64)
        pkey = np.empty(total, dtype=np.int64)
        paux = np.empty(total, dtype=np.int64)
        cdef int64_t[::1] mc = counts, mts = pts, mkey = pkey, maux = paux
        cdef double[::1] mval = pval
        cdef size_t k = 0
        for j in range(<Py_ssize_t>(n * self.n_var)):
            mc[j] = self.pools[j].size()
            for m in range(<int64_t>self.pools[j].size()):
                mts[k] = self.pools[j][m].ts
                mval[k] = self.pools[j][m].val
                mkey[k] = self.pools[j][m].key
                maux[k] = self.pools[j][m].aux
                k += 1
        nseg1 = max(self.n_seg, 1)
        return {
            "now": int(self.now), "n_users": int(n),
            "istate": self._rows_int64(n),
            "fstate": self._fstate[: n * self.fstride].copy(),
            "members": self._member_bytes(n),
            "tbits": self._tbits[: n * self.n_trait].copy(),
            "scores": self._scores[: n * self.n_score].copy(),
            "bucket": self._bucket[:n].copy(), "wake": self._wake[:n].copy(),
            "fresh": self._fresh[:n].copy(),
            "dead": self._dead[: n * self.n_items].copy(),
            "jpos": self._jpos[: n * self.n_items].copy(),
            "pool_count": counts, "pool_ts": pts, "pool_val": pval, "pool_key": pkey,
            "pool_aux": paux,
        }

    def _rows_int64(self, int64_t n):
        """The first n users' rows as one int64 array (row-major)."""
        out = np.empty(n * self.istride, dtype=np.int64)
        cdef int64_t[::1] mo = out
        cdef int64_t u
        if self.istride:
            for u in range(n):
                self._load_row(u, &mo[u * self.istride])
        return out

    def import_state(self, dict st not None):
        """Load :meth:`export_state` output into this empty kernel (same plan). Every size and
        index is checked first: a hostile snapshot raises ValueError, never corrupts memory."""
        if self.n_users:
            raise ValueError("import_state: kernel is not empty")
        n = int(st["n_users"])
        now = int(st["now"])
        if not 0 <= n < (<int64_t>1 << 32) or not 0 <= now < (<int64_t>1 << 48):
            raise ValueError("import_state: bad user count or time")
        nseg1 = max(self.n_seg, 1)
        want = {"istate": (np.int64, n * self.istride), "fstate": (np.float64, n * self.fstride),
                "members": (np.uint8, n * nseg1), "tbits": (np.uint8, n * self.n_trait),
                "scores": (np.float64, n * self.n_score), "bucket": (np.int32, n),
                "wake": (np.int64, n), "fresh": (np.uint8, n),
                "dead": (np.int64, n * self.n_items), "jpos": (np.int32, n * self.n_items),
                "pool_count": (np.int64, n * self.n_var)}
        arrs = {}
        for name, (dt, size) in want.items():
            a = st[name]
            if not isinstance(a, np.ndarray) or a.dtype != dt or a.ndim != 1 or len(a) != size:
                raise ValueError(f"import_state: `{name}` has the wrong type or size")
            arrs[name] = np.ascontiguousarray(a)
        counts = arrs["pool_count"]
        if len(counts) and (counts.min() < 0):
            raise ValueError("import_state: negative pool size")
        total = int(counts.sum()) if len(counts) else 0
        for name, dt in (("pool_ts", np.int64), ("pool_val", np.float64),
                         ("pool_key", np.int64), ("pool_aux", np.int64)):
            a = st[name]
            if not isinstance(a, np.ndarray) or a.dtype != dt or a.ndim != 1 or len(a) != total:
                raise ValueError(f"import_state: `{name}` has the wrong type or size")
            arrs[name] = np.ascontiguousarray(a)
        # journey positions must point at a step; trigger items have none
        if self.n_items and n:
            jp = arrs["jpos"].reshape(n, self.n_items)
            for i in range(self.n_items):
                hi = (self.it_send[i] - self.it_sstart[i]) if self.it_kind[i] == 1 else 0
                col = jp[:, i]
                if ((col < -1) | (col >= hi)).any():
                    raise ValueError("import_state: journey position out of range")
        self.add_users(n, arrs["bucket"])
        self.now = now
        cdef const int64_t[::1] mis = arrs["istate"]
        cdef int64_t u
        if self.istride:
            for u in range(n):
                self._store_row(u, &mis[u * self.istride])
        self._fstate[: n * self.fstride] = arrs["fstate"]
        if n:
            self._members[: n * self.mstride] = np.packbits(
                arrs["members"].reshape(n, nseg1) != 0, axis=1, bitorder="little").reshape(-1)
        self._tbits[: n * self.n_trait] = arrs["tbits"]
        self._scores[: n * self.n_score] = arrs["scores"]
        self._wake[:n] = arrs["wake"]
        self._fresh[:n] = arrs["fresh"]
        self._dead[: n * self.n_items] = arrs["dead"]
        self._jpos[: n * self.n_items] = arrs["jpos"]
        cdef int64_t[::1] mc = arrs["pool_count"], mts = arrs["pool_ts"]
        cdef int64_t[::1] mkey = arrs["pool_key"], maux = arrs["pool_aux"]
        cdef double[::1] mval = arrs["pool_val"]
        cdef Py_ssize_t j
        cdef int64_t m, k = 0
        cdef Entry ent
        for j in range(mc.shape[0]):
            self.pools[j].clear()
            for m in range(mc[j]):
                ent.ts = mts[k]
                ent.val = mval[k]
                ent.key = mkey[k]
                ent.aux = maux[k]
                self.pools[j].push_back(ent)
                k += 1
        with nogil:
            self._rebuild_heap()

    cdef size_t _timer_bytes(self):
        cdef size_t n = (self.heap.capacity() + self.over.capacity()) * sizeof(HeapItem)
        cdef size_t i
        for i in range(self.wheel.size()):
            n += self.wheel[i].capacity() * sizeof(HeapItem) + sizeof(vector[HeapItem])
        return n

    def stats(self):
        cdef size_t pooled = 0
        cdef size_t i
        for i in range(self.pools.size()):
            pooled += self.pools[i].capacity() * sizeof(Entry) + sizeof(vector[Entry])
        arrays = (self._istate.nbytes + self._fstate.nbytes + self._members.nbytes +
                  self._tbits.nbytes + self._scores.nbytes + self._bucket.nbytes +
                  self._wake.nbytes + self._pcache.nbytes)
        return {
            "users": self.n_users,
            "capacity": self.cap,
            "timers": int(np.count_nonzero(self._wake[: self.n_users] != INT64_MAX)),
            "heap_entries": self.heap.size() + self.n_wheel + self.over.size(),
            "timers_fired": self.n_fired,
            "segment_evaluations": self.n_evals,
            "memory_bytes": int(arrays + pooled + self._timer_bytes()),
        }


@cython.final
cdef class IdMap:
    """Open-addressing hash map from uint32 user numbers to dense indices (< 2**32 - 2).

    Linear probing, capacity a power of two, load factor at most 1/2. A slot is one uint64:
    the key in the low half, the dense index plus 2 in the high half (0: never used, 1: a
    removed key, which lookups probe past), so a probe reads one cache line.
    """

    cdef object _slots
    cdef uint64_t* slots
    cdef readonly int64_t size, capacity
    cdef int64_t used

    def __init__(self, int64_t capacity=1024):
        cap = 16
        while cap < 2 * capacity:
            cap *= 2
        self.size = 0
        self.used = 0
        self._alloc(cap)

    cdef void _alloc(self, int64_t cap) except *:
        slots = np.zeros(cap, dtype=np.uint64)
        cdef uint64_t[::1] ms = slots
        self._slots = slots
        self.slots = &ms[0]
        self.capacity = cap

    cdef inline int64_t _home(self, uint32_t key) noexcept nogil:
        """The first slot probed for ``key``."""
        cdef uint64_t h = (<uint64_t>key * <uint64_t>0x9E3779B97F4A7C15ULL) >> 17
        return <int64_t>(h & <uint64_t>(self.capacity - 1))

    cdef inline void _prefetch(self, uint32_t key) noexcept nogil:
        """Start fetching the first slot :meth:`_slot` probes for ``key``."""
        SEGCORE_PREFETCH(self.slots + self._home(key))

    cdef inline int64_t _slot(self, uint32_t key) noexcept nogil:
        """The slot holding ``key``, or the never-used slot where its probe ends."""
        cdef int64_t mask = self.capacity - 1
        cdef int64_t i = self._home(key)
        cdef uint64_t x = self.slots[i]
        while (x >> 32) != 0 and <uint32_t>x != key:
            i = (i + 1) & mask
            x = self.slots[i]
        return i

    cdef inline int64_t _find(self, uint32_t key) noexcept nogil:
        """Dense index of ``key``, or -1."""
        cdef uint64_t x = self.slots[self._slot(key)]
        cdef int64_t c = <int64_t>(x >> 32)
        return c - 2 if c >= 2 else -1

    def lookup(self, const uint32_t[::1] ids not None):
        """Dense index of each id, -1 where unknown."""
        cdef Py_ssize_t n = ids.shape[0], i
        out = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] mo = out
        with nogil:
            for i in range(n):
                mo[i] = self._find(ids[i])
        return out

    def get(self, uint32_t key):
        return self._find(key)

    def remove(self, uint32_t key):
        """Forget a key (its slot becomes a tombstone that lookups probe past)."""
        cdef int64_t s = self._slot(key)
        if (self.slots[s] >> 32) >= 2:
            self.slots[s] = (<uint64_t>1 << 32) | key
            self.size -= 1

    def insert(self, const uint32_t[::1] ids not None, const int64_t[::1] dense not None):
        """Add ids (not already present) with their dense indices."""
        cdef Py_ssize_t n = ids.shape[0], i
        if dense.shape[0] != n:
            raise ValueError("insert: ids and dense differ in length")
        for i in range(n):
            if not 0 <= dense[i] < ID_LIMIT:
                raise ValueError("insert: dense indices must be >= 0 and < 2**32 - 2")
        if 2 * (self.used + n) > self.capacity:     # tombstones count until a rehash
            self._grow(self.size + n)
        for i in range(n):
            self._put(ids[i], dense[i])

    def put(self, uint32_t key, int64_t dense):
        """Add one id (not already present) with its dense index."""
        if not 0 <= dense < ID_LIMIT:
            raise ValueError("put: dense indices must be >= 0 and < 2**32 - 2")
        if 2 * (self.used + 1) > self.capacity:
            self._grow(self.size + 1)
        self._put(key, dense)

    cdef inline void _put(self, uint32_t key, int64_t dense) noexcept:
        cdef int64_t s = self._slot(key)
        cdef uint64_t c = self.slots[s] >> 32
        if c == 0:
            self.used += 1                  # a never-used slot (tombstones stay used)
        if c < 2:
            self.size += 1
        self.slots[s] = (<uint64_t>(dense + 2) << 32) | key

    cdef void _grow(self, int64_t need) except *:
        """Rehash into the smallest power of two holding ``need`` keys at load 1/2."""
        old = self._slots
        cap = self.capacity
        while cap < 2 * need:
            cap *= 2
        self._alloc(cap)
        self.size = 0
        self.used = 0
        live = old[(old >> np.uint64(32)) >= 2]
        self.insert(np.ascontiguousarray(live & np.uint64(0xFFFFFFFF), dtype=np.uint32),
                    ((live >> np.uint64(32)).astype(np.int64) - 2))


# ---------------------------------------------------------------------- Engine.track's short path
_PLAIN = (str, int, float, type(None))
_NO_PROPS = {}
cdef object _EXACT = 1 << 53             # ints compared as doubles up to this


@cython.auto_pickle(False)
cdef class FastState:
    """The engine's state that :func:`track_entry` reads on every call, held in typed slots.

    ``Engine`` keeps these objects here (its ``_kernel``, ``_int_dense``, ``_str_num``,
    ``_fast``, ``_event_counts``, ``_stats`` and ``_values`` attributes are properties over
    this object), so whatever replaces one of them (a plan change, a restore) replaces it
    here, and the compiled path reads each with a C field access instead of an attribute
    lookup in the engine's ``__dict__``."""
    cdef public Kernel kernel
    cdef public IdMap ids               # int user id -> dense index
    cdef public dict str_num            # public number -> string user id
    cdef public dict specs              # event type -> Engine._fast_spec(type)
    cdef public list counts             # accepted events per event code
    cdef dict _stats                    # Engine.stats() counters (see stats below)
    cdef public dict values             # (is_str, value) -> interned value code
    cdef public object clock            # the engine's clock (None: event time only)
    cdef public bint replaying          # replaying its write-ahead log
    cdef int64_t single                 # events taken since stats was last read

    @property
    def stats(self):
        """The engine's counters, with the events the compiled path took since the last
        read added (it counts them in C: a dict update per event costs ~0.1 µs)."""
        if self.single:
            self._stats["events"] += self.single
            self._stats["batches"] += self.single
            self.single = 0
        return self._stats

    @stats.setter
    def stats(self, dict value not None):
        self.single = 0
        self._stats = value


def track_entry(object eng, object user, object event, object ts=None, object props=None,
                object id=None):
    """``Engine.track``: the compiled short path below, else the engine's general path."""
    cdef object out
    if id is None:
        out = _track_fast(eng, user, event, ts, props)
        if out is not None:
            return out
    return eng._track_general(user, event, ts, props, id)


cdef object _track_fast(object eng, object user, object event, object ts, object props):
    """``Engine.track`` (without a message id) for the common case, compiled: an int user
    (created on first sight), a known event type, an int ``ts`` in range, ``props`` None or a
    dict of plain values (str, int, float, None), an engine without a clock and not replaying
    its log. Returns the transitions, or None, having changed nothing, for anything else (the
    engine's general path then validates and applies the event).

    It reads the engine's current state on every call, from its :class:`FastState`, so a
    plan change or a restore is seen at once."""
    if type(user) is not int or type(event) is not str or type(ts) is not int or \
            not (props is None or type(props) is dict):
        return None
    cdef int ovf = 0
    cdef int64_t t = PyLong_AsLongLongAndOverflow(ts, &ovf)
    if ovf or not 0 <= t < (<int64_t>1 << 48):
        return None
    cdef int64_t uid = PyLong_AsLongLongAndOverflow(user, &ovf)
    if ovf or not 0 <= uid < (<int64_t>1 << 32):
        return None
    cdef FastState fs = eng._fs
    cdef IdMap ids = fs.ids
    ids._prefetch(<uint32_t>uid)            # (in flight while the event type is looked up)
    if fs.clock is not None or fs.replaying:
        return None
    cdef object spec = fs.specs.get(event)
    if spec is None:
        spec = eng._fast_spec(event)
    if not spec:
        return None
    cdef int64_t d = ids._find(<uint32_t>uid)
    if fs.str_num and user in fs.str_num:
        return None                         # a number given to a string id: an error
    cdef Kernel k = fs.kernel
    if d >= k.n_users:
        return None
    if d >= 0:
        k._prefetch_user(<uint32_t>d)       # (in flight while the properties are read)
    cdef tuple tspec = spec
    if len(tspec) != 4:
        return None
    cdef int32_t code = tspec[0]
    cdef list counts = fs.counts
    if code < 0 or code >= len(counts):
        return None
    cdef list filters = tspec[1]
    cdef list vals = tspec[2]
    cdef list keys = tspec[3]
    cdef dict pd
    cdef object kk, v, test, c
    cdef tuple leaf
    cdef Py_ssize_t j
    cdef int r
    cdef double x
    cdef uint8_t* fp = k.one_f
    cdef double* vp = k.one_v
    cdef int64_t* kp = k.one_k
    for j in range(k.n_filter):             # what the batch path gives a row: no filter
        fp[j] = 0                           # passed, no number, no key
    for j in range(k.n_val):
        vp[j] = NAN
    for j in range(k.n_key):
        kp[j] = -1
    if props:
        pd = <dict>props
        for kk, v in pd.items():
            if type(kk) is not str or type(v) not in _PLAIN:
                return None
        for j, p in vals:
            if not 0 <= j < k.n_val:
                return None
            v = pd.get(p)
            if v is None:
                continue
            elif type(v) is str:
                return None                 # not a number: the general path says so
            try:
                x = v
            except OverflowError:
                return None                 # (an int too large for a float: likewise)
            vp[j] = x
    else:
        pd = _NO_PROPS
    for j, test in filters:
        if not 0 <= j < k.n_filter:
            return None
        if type(test) is tuple:             # a leaf (engine.fast_test): prop, op, const, f
            leaf = <tuple>test
            v = pd.get(leaf[0])
            r = -1
            if type(leaf[2]) is str:        # == / != a string
                if type(v) is str:
                    r = (v == leaf[2]) == (<int>leaf[1] == OP_EQ)
            elif type(v) is float or (type(v) is int and -_EXACT <= v <= _EXACT):
                x = v
                if x == x:
                    r = cmp_v(<int>leaf[1], x, <double>leaf[2])
            if r < 0:
                r = 1 if leaf[3](pd.get) else 0
            fp[j] = r
        else:
            fp[j] = 1 if test(pd.get) else 0
    for j, p in keys:
        if not 0 <= j < k.n_key:
            return None
        v = pd.get(p)
        if v is None or v != v:
            kp[j] = -1
            continue
        c = fs.values.get((type(v) is str, v))
        kp[j] = <int64_t>(eng._value_code(v) if c is None else c)
    if d < 0:                               # first sight of this user
        d = eng._create_int_user(uid)
        if not 0 <= d < k.n_users:
            raise RuntimeError("track_fast: a new user was not created")
    k._admit_ts(t)
    k._one(<uint32_t>d, code, t, fp, vp, kp)
    fs.single += 1
    counts[code] += 1
    if k.fi_u.size():
        return eng._drain_list()
    if k.tr_u.size():
        if eng._hidden or eng._held is not None or eng._items:
            return eng._drain_list()
        return _drain_single(eng, fs, k)
    return []


cdef object _Transition = None


cdef list _drain_single(object eng, FastState fs, Kernel k):
    """``Engine._drain_list`` compiled, for an engine without hidden segments, held
    transitions or triggers: the kernel's buffered transitions as :class:`Transition`
    objects, the bitmaps updated at once."""
    global _Transition
    if _Transition is None:
        from .engine import Transition
        _Transition = Transition
    cdef object names = eng._plan.names
    cdef object pub = eng._pub
    cdef dict bms = eng._bm
    cdef dict strs = fs.str_num
    cdef list out = []
    cdef Py_ssize_t i, n = k.tr_u.size()
    cdef object num, name, bm
    cdef bint ent
    fs._stats["transitions"] += n
    try:
        for i in range(n):
            num = pub.item(k.tr_u[i])
            name = names[k.tr_s[i]]
            ent = k.tr_e[i] != 0
            bm = bms.get(name)
            if bm is not None:
                if ent:
                    bm.add(num)
                else:
                    bm.discard(num)
            out.append(_Transition(strs.get(num, num) if strs else num, name, ent,
                                   k.tr_t[i]))
    finally:
        k._clear_transitions()              # (drained whatever raises above)
    return out
