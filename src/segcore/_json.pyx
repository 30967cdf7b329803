# distutils: language = c++
"""``track_json`` bodies to columns, compiled.

:func:`scan_events` reads the common shape of a body straight into typed columns, with no
Python object per event: a JSON array of objects with an int ``user``, a string ``event``, an
int ``ts``, optional flat ``props`` and an optional ``id``. It accepts only bodies that the
general decoder (msgspec, with :func:`json_row_columns` after it) would decode without error,
and returns exactly the columns that path builds from them; for anything else (escapes in a
string, nesting in ``props``, unknown or repeated fields, numbers it cannot convert exactly,
malformed JSON) it returns None and the caller takes the general path, whose errors are the
documented ones. ``tests/test_json.py`` compares the two paths on random bodies.
"""

cimport cython
from libc.stdint cimport int64_t, int32_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy
from libc.math cimport isfinite, fabs
from libcpp.vector cimport vector

import numpy as np

cdef extern from "Python.h":
    ctypedef struct PyObject
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1
    double PyOS_string_to_double(const char* s, char** endptr,
                                 PyObject* overflow_exception) except? -1.0
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)


cdef inline bint _plain_int64(object v, int64_t* out):
    """Store ``v`` at ``out`` if it is a plain int that fits in int64 (else False)."""
    cdef int ovf = 0
    if type(v) is not int:
        return False
    out[0] = PyLong_AsLongLongAndOverflow(v, &ovf)
    return not ovf


def json_row_columns(list rows):
    """The columns of decoded ``track_json`` rows (objects with ``user``, ``event``, ``ts``,
    ``props`` and ``id``) in one pass: ``(users, events, tss, ids, props)``.

    ``users`` and ``tss`` are int64 arrays when every value is a plain int that fits, else
    lists of the values; ``events`` a list; ``ids`` a list, or None when no row has one;
    ``props`` a dict of property name (in order of first appearance) -> list of its value in
    every row (None where a row lacks it)."""
    cdef Py_ssize_t n = len(rows), i
    cdef object row, u, t, p, k, v, rid
    cdef list col
    cdef dict props = {}
    cdef list ulist = [None] * n, elist = [None] * n, tlist = [None] * n
    cdef list ids = None
    cdef bint uint = n > 0, tint = n > 0
    users = np.empty(n, dtype=np.int64)
    tss = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] mu = users
    cdef int64_t[::1] mt = tss
    for i in range(n):
        if i >= len(rows):                  # (a row's getter shortened the list)
            raise RuntimeError("json_row_columns: the rows changed while being read")
        row = rows[i]
        u = row.user
        t = row.ts
        ulist[i] = u
        elist[i] = row.event
        tlist[i] = t
        uint = uint and _plain_int64(u, &mu[i])
        tint = tint and _plain_int64(t, &mt[i])
        rid = row.id
        if rid is not None:
            if ids is None:
                ids = [None] * n
            ids[i] = rid
        p = row.props
        if p:
            for k, v in (<dict?>p).items():
                col = props.get(k)
                if col is None:
                    col = [None] * n
                    props[k] = col
                col[i] = v
    return (users if uint else ulist), elist, (tss if tint else tlist), ids, props


# ---------------------------------------------------------------- the direct scanner

cdef enum:
    J_NULL = 0
    J_TRUE = 1
    J_FALSE = 2
    J_INT = 3               # an int literal of at most 15 digits (exact as a double)
    J_FLOAT = 4
    J_STR = 5
    MAX_NAMES = 256         # distinct event names / property names in one body
    MAX_INT_DIGITS = 18     # ints of user, ts and id (wider ones: the general path)
    CACHE = 256             # property strings: a direct-mapped cache of decoded values
    F_USER = 1
    F_EVENT = 2
    F_TS = 4
    F_PROPS = 8
    F_ID = 16


cdef double EXACT = 9007199254740992.0      # 2**53


cdef struct Tok:
    int64_t row
    int64_t off             # J_STR: the string's first byte
    int64_t len
    int32_t kind
    double num              # J_INT, J_FLOAT: the value


cdef struct Span:
    int64_t off
    int64_t len


cdef double[23] POW10 = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
                         1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22]


cdef inline bint _is_ws(unsigned char c) noexcept nogil:
    return c == 32 or c == 10 or c == 13 or c == 9


cdef inline bint _is_digit(unsigned char c) noexcept nogil:
    return 48 <= c <= 57


cdef inline bint _same(const unsigned char* a, const unsigned char* b, int64_t k) noexcept nogil:
    """``memcmp(a, b, k) == 0`` for the short names of a body, without a call."""
    cdef int64_t j
    for j in range(k):
        if a[j] != b[j]:
            return False
    return True


@cython.final
cdef class _Scanner:
    """One pass over one body; every method returns -1 (or False) for "not the common shape"
    and the caller returns None."""
    cdef const unsigned char* s
    cdef int64_t n, i
    # the current number: its end, whether an int literal, its value when narrow enough
    cdef int64_t num_end
    cdef bint num_int
    cdef int64_t num_ival
    cdef int64_t num_digits
    cdef double num_val
    # user and ts: int64 until a row has a string (then lists of the values)
    cdef vector[int64_t] users, tss
    cdef list ulist, tlist
    cdef vector[int64_t] inv
    cdef vector[Span] names
    cdef list name_objs
    cdef vector[Span] keys
    cdef list key_objs
    cdef vector[vector[Tok]] toks
    cdef vector[int64_t] id_rows
    cdef list id_objs

    def __cinit__(self):
        self.name_objs = []
        self.key_objs = []
        self.id_objs = []

    cdef inline void _ws(self) noexcept nogil:
        # (locals: a store to self.i could alias the body's bytes, so in the loop it would
        # stay in memory)
        cdef const unsigned char* s = self.s
        cdef int64_t i = self.i, n = self.n
        while i < n and _is_ws(s[i]):
            i += 1
        self.i = i

    cdef inline int _peek(self) noexcept nogil:
        """The byte at the cursor, or -1 at the end."""
        return self.s[self.i] if self.i < self.n else -1

    cdef int64_t _string(self) noexcept nogil:
        """At an opening quote: move past the string and return its first byte's offset; -1
        for an escape, a control byte or no closing quote."""
        cdef const unsigned char* s = self.s
        cdef int64_t j = self.i + 1, c0, n = self.n
        cdef unsigned char c
        while j < n:
            c = s[j]
            if c == 34:                                     # "
                c0 = self.i + 1
                self.i = j + 1
                return c0
            if c == 92 or c < 32:                           # \ or a control byte
                return -1
            j += 1
        return -1

    cdef bint _number(self) noexcept:
        """A JSON number at the cursor (strict grammar), into num_*; False if malformed, out
        of the double range, or at the end of the body."""
        cdef int64_t j = self.i, start = self.i, e10 = 0, ex = 0, sig = 0
        cdef uint64_t m = 0
        cdef bint neg = False, eneg = False
        cdef const unsigned char* s = self.s
        cdef int64_t n = self.n
        if j < n and s[j] == 45:                  # -
            neg = True
            j += 1
        if j >= n or not _is_digit(s[j]):
            return False
        if s[j] == 48:                                 # a leading 0 stands alone
            j += 1
        else:
            while j < n and _is_digit(s[j]):
                if sig < 19:
                    m = m * 10 + (s[j] - 48)
                sig += 1
                j += 1
        self.num_digits = sig
        self.num_int = True
        if j < n and s[j] == 46:                  # .
            self.num_int = False
            j += 1
            if j >= n or not _is_digit(s[j]):
                return False
            while j < n and _is_digit(s[j]):
                if sig < 19:                # (leading zeros of a fraction do not count)
                    m = m * 10 + (s[j] - 48)
                    e10 -= 1
                    if sig or s[j] != 48:
                        sig += 1
                else:
                    sig += 1
                j += 1
        if j < n and (s[j] == 101 or s[j] == 69):      # e E
            self.num_int = False
            j += 1
            if j < n and (s[j] == 43 or s[j] == 45):
                eneg = s[j] == 45
                j += 1
            if j >= n or not _is_digit(s[j]):
                return False
            while j < n and _is_digit(s[j]):
                if ex < 100000:
                    ex = ex * 10 + (s[j] - 48)
                j += 1
            e10 += -ex if eneg else ex
        if j >= n:                   # (a number cannot end a valid body)
            return False
        self.num_end = j
        if self.num_int:
            if sig > MAX_INT_DIGITS:
                self.num_ival = 0
                self.num_digits = 99
                return True
            self.num_ival = -<int64_t>m if neg else <int64_t>m
            self.num_val = <double>self.num_ival
            return True
        # a float: exact by the fast path (mantissa < 2**53, |power of ten| <= 22: one
        # correctly rounded operation), else the interpreter's own correctly rounded parser
        if sig <= 15 and -22 <= e10 <= 22:
            self.num_val = <double>m * POW10[e10] if e10 >= 0 else <double>m / POW10[-e10]
            if neg:
                self.num_val = -self.num_val
            return True
        return self._parse_double(start, j)

    cdef bint _parse_double(self, int64_t start, int64_t j) noexcept:
        """num_val = the float text s[start:j], by the interpreter's correctly rounded parser;
        False unless it reads exactly that text to a finite value."""
        cdef char* end = NULL
        try:
            self.num_val = PyOS_string_to_double(<const char*>self.s + start, &end, NULL)
        except Exception:                   # (no number; or out of memory: the general path
            return False                    # then takes the body and says so)
        return end == <char*>(self.s + j) and isfinite(self.num_val)

    cdef bint _literal(self, const char* word, int64_t k) noexcept nogil:
        if self.i + k > self.n or not _same(self.s + self.i, <const unsigned char*>word, k):
            return False
        self.i += k
        return True

    cdef int64_t _lookup(self, vector[Span]* table, int64_t off, int64_t k) noexcept nogil:
        cdef size_t j
        for j in range(table.size()):
            if table[0][j].len == k and _same(self.s + table[0][j].off, self.s + off, k):
                return j
        return -1

    cdef object _decode(self, int64_t off, int64_t k):
        """The str of the k bytes at ``off``, or None if they are not valid UTF-8."""
        try:
            return PyUnicode_DecodeUTF8(<const char*>self.s + off, k, NULL)
        except UnicodeDecodeError:
            return None

    cdef object _str_value(self):
        """The string at the cursor (an opening quote) as a str, moved past; None if it has
        an escape or a control byte, is not closed or is not valid UTF-8."""
        cdef int64_t off = self._string()
        return None if off < 0 else self._decode(off, self.i - 1 - off)

    cdef bint _narrow_int(self) noexcept:
        """An int literal of at most MAX_INT_DIGITS digits at the cursor into num_ival,
        moved past (else False)."""
        if not self._number() or not self.num_int or self.num_digits > MAX_INT_DIGITS:
            return False
        self.i = self.num_end
        return True

    cdef int64_t _intern(self, vector[Span]* table, list objs) except -2:
        """The string at the cursor (an opening quote), moved past, as its index in ``table``
        (bytes) and ``objs`` (their str), added when new; -1 as :meth:`_str_value`, or past
        MAX_NAMES distinct strings."""
        cdef int64_t off = self._string(), k, x
        if off < 0:
            return -1
        k = self.i - 1 - off
        x = self._lookup(table, off, k)
        if x >= 0:
            return x
        if <int64_t>table.size() >= MAX_NAMES:
            return -1
        name = self._decode(off, k)
        if name is None:
            return -1
        table.push_back(Span(off, k))
        objs.append(name)
        return table.size() - 1

    cdef int _int_or_str(self, vector[int64_t]* col, int which) except -2:
        """A user (which=0) or ts (1) value at the cursor: an int that fits, or a string."""
        cdef list lst = self.ulist if which == 0 else self.tlist
        if self._peek() == 34:
            v = self._str_value()
            if v is None:
                return -1
            if lst is None:
                lst = [x for x in col[0]]
                if which == 0:
                    self.ulist = lst
                else:
                    self.tlist = lst
            lst.append(v)
            return 0
        if not self._narrow_int():
            return -1
        if lst is None:
            col.push_back(self.num_ival)
        else:
            lst.append(self.num_ival)
        return 0

    cdef int _props(self, int64_t row) except -2:
        """A ``props`` object (or null) at the cursor: each value's token under its name."""
        cdef int64_t kx
        cdef int c
        cdef Tok t
        if self._peek() == 110:                              # null
            return 0 if self._literal(b"null", 4) else -1
        if self._peek() != 123:                              # {
            return -1
        self.i += 1
        self._ws()
        if self._peek() == 125:                              # }
            self.i += 1
            return 0
        while True:
            if self._peek() != 34:
                return -1
            kx = self._intern(&self.keys, self.key_objs)
            if kx < 0:
                return -1
            if kx == <int64_t>self.toks.size():                # a new name
                self.toks.resize(kx + 1)
            elif self.toks[kx].size() and self.toks[kx].back().row == row:
                return -1                                    # a repeated name
            self._ws()
            if self._peek() != 58:                           # :
                return -1
            self.i += 1
            self._ws()
            c = self._peek()
            t.row = row
            t.off = 0
            t.len = 0
            t.num = 0
            if c == 34:
                t.off = self._string()
                if t.off < 0:
                    return -1
                t.len = self.i - 1 - t.off
                t.kind = J_STR
            elif c == 116:
                if not self._literal(b"true", 4):
                    return -1
                t.kind = J_TRUE
            elif c == 102:
                if not self._literal(b"false", 5):
                    return -1
                t.kind = J_FALSE
            elif c == 110:
                if not self._literal(b"null", 4):
                    return -1
                t.kind = J_NULL
            else:
                if not self._number():
                    return -1
                if self.num_int and self.num_digits > 15:
                    return -1            # (may not be exact as a double: the general path)
                self.i = self.num_end
                t.kind = J_INT if self.num_int else J_FLOAT
                t.num = self.num_val
            self.toks[kx].push_back(t)
            self._ws()
            c = self._peek()
            if c == 44:                                      # ,
                self.i += 1
                self._ws()
                continue
            if c == 125:                                     # }
                self.i += 1
                return 0
            return -1

    cdef inline int _field(self) noexcept nogil:
        """The field name at the cursor (``"user"`` ...: F_USER ...), moved past; 0 for
        anything else (no other name is valid)."""
        cdef const unsigned char* p = self.s + self.i
        cdef int64_t left = self.n - self.i
        cdef int f = 0, k = 0
        cdef const char* word
        if left < 4 or p[0] != 34:
            return 0
        if p[1] == 117:                                   # "user"
            f, k = F_USER, 6
            word = b'"user"'
        elif p[1] == 101:                                 # "event"
            f, k = F_EVENT, 7
            word = b'"event"'
        elif p[1] == 116:                                 # "ts"
            f, k = F_TS, 4
            word = b'"ts"'
        elif p[1] == 112:                                 # "props"
            f, k = F_PROPS, 7
            word = b'"props"'
        elif p[1] == 105:                                 # "id"
            f, k = F_ID, 4
            word = b'"id"'
        else:
            return 0
        if left < k or not _same(p, <const unsigned char*>word, k):
            return 0
        self.i += k
        return f

    cdef int _row(self, int64_t row) except -2:
        """One event object at the cursor (just past its ``{``)."""
        cdef int seen = 0, f, c
        cdef int64_t ex
        self._ws()
        while True:
            f = self._field()
            if f == 0 or seen & f:
                return -1
            seen |= f
            self._ws()
            if self._peek() != 58:
                return -1
            self.i += 1
            self._ws()
            if f == F_USER:
                if self._int_or_str(&self.users, 0) < 0:
                    return -1
            elif f == F_TS:
                if self._int_or_str(&self.tss, 1) < 0:
                    return -1
            elif f == F_EVENT:
                if self._peek() != 34:
                    return -1
                ex = self._intern(&self.names, self.name_objs)
                if ex < 0:
                    return -1
                self.inv.push_back(ex)
            elif f == F_PROPS:
                if self._props(row) < 0:
                    return -1
            else:
                if self._id(row) < 0:
                    return -1
            self._ws()
            c = self._peek()
            if c == 44:
                self.i += 1
                self._ws()
                continue
            if c == 125:
                self.i += 1
                break
            return -1
        return 0 if seen & (F_USER | F_EVENT | F_TS) == (F_USER | F_EVENT | F_TS) else -1

    cdef int _id(self, int64_t row) except -2:
        """An ``id`` at the cursor: null, a string or an int that fits."""
        cdef int c = self._peek()
        if c == 110:
            return 0 if self._literal(b"null", 4) else -1
        if c == 34:
            v = self._str_value()
            if v is None:
                return -1
        elif self._narrow_int():
            v = self.num_ival
        else:
            return -1
        self.id_rows.push_back(row)
        self.id_objs.append(v)
        return 0

    cdef object _int_column(self, vector[int64_t]* col, list lst):
        if lst is not None:
            return lst
        arr = np.empty(col.size(), dtype=np.int64)
        cdef int64_t[::1] m = arr
        if col.size():
            memcpy(&m[0], col.data(), col.size() * sizeof(int64_t))
        return arr

    cdef object _prop_column(self, int64_t kx, int64_t n):
        """A property's column as the general path builds it: float64 (NaN where absent)
        when every value is a number (and one at least), else an object column; None if a
        string is not valid UTF-8."""
        cdef vector[Tok]* ts = &self.toks[kx]
        cdef size_t j
        cdef bint numeric = True, has_num = False, has_int = False, wide = False
        cdef Tok t
        for j in range(ts.size()):
            t = ts[0][j]
            if t.kind == J_INT or t.kind == J_FLOAT:
                has_num = True
                has_int = has_int or t.kind == J_INT
                wide = wide or fabs(t.num) > EXACT
            elif t.kind != J_NULL:
                numeric = False
                break
        # (as the general path: with an int among them, a number beyond 2**53 keeps the
        # column of objects, so that no int is rounded)
        if numeric and has_num and not (has_int and wide):
            arr = np.full(n, np.nan, dtype=np.float64)
            self._fill_floats(arr, ts)
            return arr
        cdef list vals = [None] * n
        cdef list cache = [None] * CACHE
        cdef int64_t[CACHE] c_off
        cdef int64_t[CACHE] c_len
        cdef uint32_t h
        cdef int64_t q
        for j in range(CACHE):
            c_len[j] = -1
        for j in range(ts.size()):
            t = ts[0][j]
            if t.kind == J_STR:
                h = 2166136261
                for q in range(t.off, t.off + t.len):
                    h = (h ^ self.s[q]) * 16777619
                h &= CACHE - 1
                if c_len[h] == t.len and memcmp(self.s + c_off[h], self.s + t.off, t.len) == 0:
                    v = cache[h]
                else:
                    v = self._decode(t.off, t.len)
                    if v is None:
                        return None
                    cache[h] = v
                    c_off[h] = t.off
                    c_len[h] = t.len
            elif t.kind == J_INT:
                v = <int64_t>t.num
            elif t.kind == J_FLOAT:
                v = t.num
            elif t.kind == J_TRUE:
                v = True
            elif t.kind == J_FALSE:
                v = False
            else:
                v = None
            vals[t.row] = v
        return np.fromiter(vals, dtype=object, count=n)

    cdef void _fill_floats(self, object arr, vector[Tok]* ts):
        cdef double[::1] m = arr
        cdef size_t j
        for j in range(ts.size()):
            if ts[0][j].kind != J_NULL:
                m[ts[0][j].row] = ts[0][j].num


def scan_events(const unsigned char[::1] body):
    """The columns of a ``track_json`` body of the common shape, with no Python object per
    event: ``(users, names, inv, tss, ids, props)`` where ``users`` and ``tss`` are as
    :func:`json_row_columns` makes them, ``names`` the distinct event names in order of first
    appearance and ``inv`` (int64) each row's index into them, ``ids`` a list or None, and
    ``props`` a dict of property name -> the column the general path would build (float64
    with NaN where absent when every value is a number, else object). None for anything
    outside that shape, or that the general path would reject."""
    cdef _Scanner sc = _Scanner()
    cdef int64_t row = 0, kx, n
    cdef int c
    sc.n = body.shape[0]
    if sc.n == 0:
        return None
    sc.s = &body[0]
    sc.i = 0
    sc._ws()
    if sc._peek() != 91:                                     # [
        return None
    sc.i += 1
    sc._ws()
    while True:
        if sc._peek() != 123:                                # {
            return None
        sc.i += 1
        if sc._row(row) < 0:
            return None
        row += 1
        sc._ws()
        c = sc._peek()
        if c == 44:
            sc.i += 1
            sc._ws()
            continue
        if c == 93:                                          # ]
            sc.i += 1
            break
        return None
    sc._ws()
    if sc.i != sc.n:
        return None
    n = row
    props = {}
    for kx in range(<int64_t>sc.keys.size()):
        col = sc._prop_column(kx, n)
        if col is None:
            return None
        props[sc.key_objs[kx]] = col
    ids = None
    if sc.id_rows.size():
        ids = [None] * n
        for kx in range(<int64_t>sc.id_rows.size()):
            ids[sc.id_rows[kx]] = sc.id_objs[kx]
    inv = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] mi = inv
    if n:
        memcpy(&mi[0], sc.inv.data(), n * sizeof(int64_t))
    return (sc._int_column(&sc.users, sc.ulist), sc.name_objs, inv,
            sc._int_column(&sc.tss, sc.tlist), ids, props)
