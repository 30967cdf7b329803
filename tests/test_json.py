"""The compiled ``track_json`` scanner against the general decoder (msgspec).

``Engine.track_json`` reads a body of the common shape with ``segcore._json.scan_events`` and
anything else through msgspec. The scanner must take only bodies the general path accepts and
build exactly its columns: these tests compare the two on random bodies, random numbers and
random corruptions, and pin what each path takes. (Both engines' behaviour on JSON bodies is
in test_semantics.py and test_differential.py.)
"""

import json
import math
import random

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segcore import EventError
from segcore._json import scan_events
from segcore.engine import _decoded_columns, _EventNames, _json_columns


def _same_value(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and
                                                     math.copysign(1, a) == math.copysign(1, b))
    return a == b


def _same_column(a, b, what):
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), what
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype)
    assert all(_same_value(x, y) for x, y in zip(a.tolist(), b.tolist())), (what, a, b)


def _check_same(body: bytes):
    """If the scanner takes ``body``, its columns are the general path's, exactly."""
    fast = scan_events(body)
    try:
        slow = _decoded_columns(body)
    except EventError:
        assert fast is None, body
        return None
    if fast is None:
        return False
    users, events, tss, cols, ids = _json_columns(body)
    assert isinstance(events, _EventNames)
    names = np.array(events.names + [None], dtype=object)[events.inv] if len(events.inv) \
        else np.zeros(0, dtype=object)
    _same_column(users, slow[0], "users")
    _same_column(names, slow[1], "events")
    _same_column(tss, slow[2], "ts")
    assert list(cols) == list(slow[3]), body
    for k in cols:
        _same_column(cols[k], slow[3][k], k)
    assert (ids is None) == (slow[4] is None), body
    if ids is not None:
        _same_column(ids, slow[4], "ids")
    return True


def test_the_common_shape_is_read_by_the_scanner():
    body = (b' [ {"user": 12, "event": "purchase", "ts": 1700000000000,\n'
            b'     "props": {"amount": 19.99, "category": "shoes", "qty": 2, "gift": false}},\n'
            b'   {"ts": 1700000000001, "event": "view", "user": "ann", "id": "m-1",\n'
            b'    "props": {"category": "caf\xc3\xa9", "amount": null}},\n'
            b'   {"user": 12, "event": "purchase", "ts": "2023-11-14T22:13:20Z", "id": 7,'
            b'    "props": null} ] ')
    assert _check_same(body) is True
    users, names, inv, tss, ids, props = scan_events(body)
    assert users == [12, "ann", 12] and names == ["purchase", "view"]
    assert inv.tolist() == [0, 1, 0]
    assert tss == [1700000000000, 1700000000001, "2023-11-14T22:13:20Z"]
    assert ids == [None, "m-1", 7]
    assert list(props) == ["amount", "category", "qty", "gift"]
    assert props["amount"].dtype == np.float64 and props["amount"][0] == 19.99
    assert np.isnan(props["amount"][1:]).all()
    assert props["category"].tolist() == ["shoes", "café", None]
    assert props["gift"].tolist() == [False, None, None]
    plain = b'[{"user": 1, "event": "x", "ts": 2}, {"user": 3, "event": "x", "ts": 4}]'
    users, names, inv, tss, ids, props = scan_events(plain)
    assert users.dtype == tss.dtype == np.int64 and users.tolist() == [1, 3]
    assert (names, inv.tolist(), tss.tolist(), ids, props) == (["x"], [0, 0], [2, 4], None, {})


@pytest.mark.parametrize("body", [
    b'[]', b'', b'{}', b'[{}]', b'[1]',
    b'[{"user": 1, "event": "x", "ts": 1, "other": 2}]',             # unknown field
    b'[{"user": 1, "user": 2, "event": "x", "ts": 1}]',              # a repeated field
    b'[{"user": 1, "event": "x"}]',                                  # a missing one
    b'[{"user": 1, "event": "x\\u00e9", "ts": 1}]',                  # an escape
    b'[{"user": 1, "event": "x", "ts": 1, "props": {"a": [1]}}]',    # nesting
    b'[{"user": 1, "event": "x", "ts": 1, "props": {"a": 1, "a": 2}}]',
    b'[{"user": 1, "event": "x", "ts": 1, "props": {"a": 12345678901234567}}]',
    b'[{"user": 1, "event": "x", "ts": 1, "props": {"a": 1e400}}]',
    b'[{"user": 1.0, "event": "x", "ts": 1}]', b'[{"user": true, "event": "x", "ts": 1}]',
    b'[{"user": 1234567890123456789, "event": "x", "ts": 1}]',
    b'[{"user": 1, "event": 5, "ts": 1}]', b'[{"user": 1, "event": "x", "ts": 01}]',
    b'[{"user": 1, "event": "x", "ts": 1, "id": 1.5}]',
    b'[{"user": 1, "event": "\xff", "ts": 1}]',                     # not UTF-8
    b'[{"user": 1, "event": "x", "ts": 1}] x', b'[{"user": 1, "event": "x", "ts": 1},]',
    b'[{"user": 1, "event": "x", "ts": 1}', b'\xef\xbb\xbf[{"user": 1, "event": "x", "ts": 1}]',
])
def test_anything_else_goes_to_the_general_path(body):
    assert scan_events(body) is None
    assert _check_same(body) in (None, False)


def test_a_body_the_general_path_rejects_keeps_its_error():
    """Bodies the scanner leaves alone still get the documented errors, row and field."""
    for body, index, field in [
            (b'[{"user": 1, "event": "x", "ts": 1, "props": {"a": {"b": 1}}}]', 0, "props.a"),
            (b'[{"user": 1, "event": "x", "ts": 1}, {"user": 1, "event": "x", "ts": 1, '
             b'"more": 1}]', 1, None),
            (b'[{"user": 1, "event": "", "ts": 1}, {"user": 1, "event": "x", "ts": 1}]',
             None, None)]:
        if index is None:                   # (an empty event name is the engine's error)
            assert scan_events(body) is not None
            continue
        with pytest.raises(EventError) as e:
            _json_columns(body)
        assert e.value.index == index and (field is None or e.value.field == field)


NUMBER_TEXT = st.from_regex(r"\A-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,24})?([eE][+-]?[0-9]{1,3})?\Z")


@settings(max_examples=1500, deadline=None)
@given(st.one_of(NUMBER_TEXT, st.floats(allow_nan=False, allow_infinity=False).map(repr)))
def test_numbers_convert_like_the_general_path(text):
    """Property numbers: every float text (the fast exact path and the slow one) and every
    int of up to 15 digits gives the general path's value, to the bit; a float beyond the
    double range is the general path's error, wider ints its (exact) path."""
    body = b'[{"user": 1, "event": "x", "ts": 1, "props": {"a": %s}}]' % text.encode()
    got = _check_same(body)
    ok_int = text.lstrip("-").isdigit() and len(text.lstrip("-")) <= 15
    if "e" not in text.lower() and "." not in text:
        assert got is ok_int, text
    else:
        assert got is (True if math.isfinite(float(text)) else None), text


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
    st.integers(-10 ** 15, 10 ** 15), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6), st.sampled_from(["shoes", "bags", "", "é", "\u2028"]))
ROWS = st.fixed_dictionaries(
    {"user": st.one_of(st.integers(-5, 2 ** 62), st.text(max_size=4)),
     "event": st.one_of(st.sampled_from(["buy", "view", "", "é"]), st.text(max_size=3)),
     "ts": st.one_of(st.integers(-5, 2 ** 62), st.sampled_from(["1970-01-01T00:00:01Z"]))},
    optional={"props": st.one_of(st.none(), st.dictionaries(
        st.one_of(st.sampled_from(["amount", "cat", "n"]), st.text(max_size=3)),
        st.one_of(SCALARS, st.lists(st.integers(), max_size=1)), max_size=4)),
        "id": st.one_of(st.none(), st.integers(-2 ** 64, 2 ** 64), st.text(max_size=4))})


@settings(max_examples=400, deadline=None)
@given(st.lists(ROWS, max_size=8), st.booleans(), st.sampled_from([None, 1]),
       st.randoms(use_true_random=False))
def test_random_bodies_give_the_general_paths_columns(rows, ascii_only, indent, rnd):
    body = json.dumps(rows, ensure_ascii=ascii_only, indent=indent).encode()
    _check_same(body)
    _check_same(msgspec.json.encode(rows))
    # and with one byte changed, removed or added: accepted only if the general path accepts
    pos = rnd.randrange(len(body) + 1)
    byte = bytes([rnd.choice(b'{}[]":,0-9e.\\ \xc3\xa9tfn')])
    for bad in (body[:pos] + byte + body[pos + 1:], body[:pos] + body[pos + 1:],
                body[:pos] + byte + body[pos:]):
        _check_same(bad)


def test_a_big_common_body_is_read_whole():
    rnd = random.Random(4)
    rows = [{"user": rnd.randrange(10 ** 6), "event": rnd.choice(["view", "buy", "cart"]),
             "ts": 1_700_000_000_000 + i,
             "props": {"amount": round(rnd.random() * 100, 2),
                       "category": rnd.choice(["shoes", "bags", "hats"])}}
            for i in range(5000)]
    assert _check_same(msgspec.json.encode(rows)) is True
