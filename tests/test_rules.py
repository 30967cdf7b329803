"""The rule language: parser, AST, text and JSON forms, the Python builder, and their errors.

Every way of writing a rule (text, JSON, :mod:`segcore.build`) must end in the same AST; every
bad rule must fail with a :class:`RuleError` that says what and where.
"""

from __future__ import annotations

import functools
import json
import operator
import re
from datetime import timedelta

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segcore.build
from segcore import build as b
from segcore.errors import RuleError
from segcore.rules import (
    DURATION_MS, MAX_TIME_MS, Abandoned, Agg, And, Arith, Between, Bucket, Compare, Dur,
    Exists, First, FirstSeen, Inactive, InList, InSegment, Last, LastSeen, Not, Now, Num, Or,
    Prop, Score, Seen, Str, StrTest, Trait, from_json, parse, parse_duration, parse_full,
    references, to_json, to_text, topo_order, validate,
)

H = DURATION_MS["h"]
D = DURATION_MS["d"]
W = DURATION_MS["w"]


def count(event, where=None, window_ms=None):
    return Agg("count", event, None, where, window_ms)


def agg(fn, event, prop, where=None, window_ms=None):
    return Agg(fn, event, prop, where, window_ms)


def did(event, where=None, window_ms=None):
    return Compare(">=", count(event, where, window_ms), Num(1))


def ge(left, right):
    return Compare(">=", left, right)


def eq(left, right):
    return Compare("==", left, right)


# =========================================================================== DESIGN examples
DESIGN_SECTION_1 = [
    ("count(purchase, 90d) >= 3", ge(count("purchase", None, 90 * D), Num(3))),
    ("sum(purchase.amount) >= 500", ge(agg("sum", "purchase", "amount"), Num(500))),
    ('count(product_view where category == "shoes", 7d) >= 3 and not did(purchase, 30d)',
     And((ge(count("product_view", eq(Prop("category"), Str("shoes")), 7 * D), Num(3)),
          Not(did("purchase", None, 30 * D))))),
    ("count(app_open, 7d) >= 5", ge(count("app_open", None, 7 * D), Num(5))),
    ("did(support_ticket, 3d)", did("support_ticket", None, 3 * D)),
    ("seen and inactive(30d)", And((Seen(), Inactive(30 * D)))),
    ("count(email_open, 30d) >= 3 and count(email_click, 30d) == 0",
     And((ge(count("email_open", None, 30 * D), Num(3)),
          eq(count("email_click", None, 30 * D), Num(0))))),
    ("abandoned(add_to_cart, purchase, 1h)", Abandoned("add_to_cart", "purchase", H, None)),
    ("abandoned(add_to_cart, purchase, 1h) by cart_id",
     Abandoned("add_to_cart", "purchase", H, "cart_id")),
    ("count(product_view, 1d) >= 5", ge(count("product_view", None, D), Num(5))),
    ("first_seen >= now - 7d", ge(FirstSeen(), Arith("-", Now(), Dur(7 * D)))),
    ('trait.country == "SE" and in(frequent_buyers)',
     And((eq(Trait("country"), Str("SE")), InSegment("frequent_buyers")))),
    ("score.churn >= 0.7 and in(high_ltv)",
     And((ge(Score("churn"), Num(0.7)), InSegment("high_ltv")))),
    ("bucket(0, 999)", Bucket(0, 999)),
]

DESIGN_SECTION_3 = [
    ("count(product_view where category in [3, 4], 2d) >= 4",
     ge(count("product_view", InList(Prop("category"), (3, 4)), 2 * D), Num(4))),
    ('sum(purchase.amount where currency == "EUR", 30d) > 200',
     Compare(">", agg("sum", "purchase", "amount", eq(Prop("currency"), Str("EUR")), 30 * D),
             Num(200))),
    ("first_seen >= now - 7d", ge(FirstSeen(), Arith("-", Now(), Dur(7 * D)))),
    ('trait.country == "SE" and not in(vip)',
     And((eq(Trait("country"), Str("SE")), Not(InSegment("vip"))))),
    ("abandoned(add_to_cart, purchase, 1h) by cart_id",
     Abandoned("add_to_cart", "purchase", H, "cart_id")),
]


@pytest.mark.parametrize("text, ast", DESIGN_SECTION_1 + DESIGN_SECTION_3,
                         ids=[t for t, _ in DESIGN_SECTION_1 + DESIGN_SECTION_3])
def test_design_examples_parse_to_the_expected_ast(text, ast):
    assert parse(text) == ast
    validate(ast)


def test_did_is_count_at_least_one():
    assert parse("did(a where x == 1, 2d)") == parse("count(a where x == 1, 2d) >= 1")
    assert parse("did(a)") == ge(count("a"), Num(1))


# =========================================================================== constructs
CONSTRUCTS = [
    # aggregates, every function, with and without where / window
    ("count(a) > 0", Compare(">", count("a"), Num(0))),
    ("count(a, all) > 0", Compare(">", count("a"), Num(0))),
    ("count(a, 10m) > 0", Compare(">", count("a", None, 600_000), Num(0))),
    ("count(a where x == 1) > 0", Compare(">", count("a", eq(Prop("x"), Num(1))), Num(0))),
    ("count(a where x == 1, all) > 0",
     Compare(">", count("a", eq(Prop("x"), Num(1))), Num(0))),
    ("sum(a.v, 1h) > 1", Compare(">", agg("sum", "a", "v", None, H), Num(1))),
    ("avg(a.v) < 2.5", Compare("<", agg("avg", "a", "v"), Num(2.5))),
    ("min(a.v where k != \"x\") <= 0",
     Compare("<=", agg("min", "a", "v", Compare("!=", Prop("k"), Str("x"))), Num(0))),
    ("max(a.v, 2w) >= 10", ge(agg("max", "a", "v", None, 2 * W), Num(10))),
    ("distinct(a.sku, 30d) >= 3", ge(agg("distinct", "a", "sku", None, 30 * D), Num(3))),
    ("did(a where x > 1)", did("a", Compare(">", Prop("x"), Num(1)))),
    ("did(a, all)", did("a")),
    # time terms
    ("last_seen < now - 1d", Compare("<", LastSeen(), Arith("-", Now(), Dur(D)))),
    ("now - last(purchase) > 30d",
     Compare(">", Arith("-", Now(), Last("purchase")), Dur(30 * D))),
    ("first(signup) >= now - 2h", ge(First("signup"), Arith("-", Now(), Dur(2 * H)))),
    ("now - first_seen > 1d + 2h",
     Compare(">", Arith("-", Now(), FirstSeen()), Arith("+", Dur(D), Dur(2 * H)))),
    # traits and scores with every test
    ("trait.age != 18", Compare("!=", Trait("age"), Num(18))),
    ("trait.age < 18", Compare("<", Trait("age"), Num(18))),
    ('trait.plan in ["pro", "team"]', InList(Trait("plan"), ("pro", "team"))),
    ('trait.plan not in ["free"]', InList(Trait("plan"), ("free",), True)),
    ("trait.plan in []", InList(Trait("plan"), ())),
    ('trait.x in [1, -2, 2.5, "a", 1h]', InList(Trait("x"), (1, -2, 2.5, "a", H))),
    ("trait.age between 18 and 30", Between(Trait("age"), Num(18), Num(30))),
    ("score.ltv between -1 and 2.5", Between(Score("ltv"), Num(-1), Num(2.5))),
    ('trait.email contains "@"', StrTest("contains", Trait("email"), "@")),
    ('trait.email startswith "a"', StrTest("startswith", Trait("email"), "a")),
    ('trait.email matches "^[a-z]+@x\\\\.com$"',
     StrTest("matches", Trait("email"), "^[a-z]+@x\\.com$")),
    ("trait.email exists", Exists(Trait("email"))),
    ("score.churn exists", Exists(Score("churn"))),
    ("not trait.email exists", Not(Exists(Trait("email")))),
    # where with every test
    ("count(a where x in [1, 2]) > 0", Compare(">", count("a", InList(Prop("x"), (1, 2))),
                                              Num(0))),
    ("count(a where x not in [1]) > 0", Compare(">", count("a", InList(Prop("x"), (1,), True)),
                                               Num(0))),
    ("count(a where x between 1 and 2) > 0",
     Compare(">", count("a", Between(Prop("x"), Num(1), Num(2))), Num(0))),
    ('count(a where url contains "/p/") > 0',
     Compare(">", count("a", StrTest("contains", Prop("url"), "/p/")), Num(0))),
    ("count(a where coupon exists) > 0", Compare(">", count("a", Exists(Prop("coupon"))),
                                                Num(0))),
    ("count(a where not coupon exists and (x == 1 or y == 2)) > 0",
     Compare(">", count("a", And((Not(Exists(Prop("coupon"))),
                                  Or((eq(Prop("x"), Num(1)), eq(Prop("y"), Num(2))))))),
             Num(0))),
    # property names that are keywords elsewhere are plain properties inside where
    ("count(a where seen == 1 and count == 2 and first == 3) > 0",
     Compare(">", count("a", And((eq(Prop("seen"), Num(1)), eq(Prop("count"), Num(2)),
                                  eq(Prop("first"), Num(3))))), Num(0))),
    # conditions
    ("seen", Seen()),
    ("in(vip)", InSegment("vip")),
    ("bucket(0, 9999)", Bucket(0, 9999)),
    ("bucket(5, 5)", Bucket(5, 5)),
    ("inactive(1ms)", Inactive(1)),
    ("abandoned(a, b, 0ms)", Abandoned("a", "b", 0)),
    # value arithmetic, left-associative, parentheses on the right kept
    ("count(a) + count(b) >= 3", ge(Arith("+", count("a"), count("b")), Num(3))),
    ("count(a) - 1 - 2 > 0",
     Compare(">", Arith("-", Arith("-", count("a"), Num(1)), Num(2)), Num(0))),
    ("count(a) - (1 - 2) > 0",
     Compare(">", Arith("-", count("a"), Arith("-", Num(1), Num(2))), Num(0))),
    ("(count(a) + 1) > 2", Compare(">", Arith("+", count("a"), Num(1)), Num(2))),
    ("3 <= count(a)", Compare("<=", Num(3), count("a"))),
    ("score.a >= score.b", ge(Score("a"), Score("b"))),
    ("sum(a.v) - sum(b.v) > 0",
     Compare(">", Arith("-", agg("sum", "a", "v"), agg("sum", "b", "v")), Num(0))),
    # names that are keywords in other places
    ("count(all, all) > 0", Compare(">", count("all"), Num(0))),
    ("trait.and == 1", eq(Trait("and"), Num(1))),
    ("in(where)", InSegment("where")),
    ("sum(a.where) > 0", Compare(">", agg("sum", "a", "where"), Num(0))),
    ("abandoned(a, b, 1h) by by", Abandoned("a", "b", H, "by")),
    # whitespace and newlines are free
    ("  count( a ,\n 1d )\t>=\n3 ", ge(count("a", None, D), Num(3))),
    ("count(a,1d)>=3", ge(count("a", None, D), Num(3))),
]


@pytest.mark.parametrize("text, ast", CONSTRUCTS, ids=[t for t, _ in CONSTRUCTS])
def test_every_construct(text, ast):
    assert parse(text) == ast
    validate(ast)
    assert parse(to_text(ast)) == ast


# =========================================================================== precedence
def test_precedence_not_over_and_over_or():
    s, v, k = Seen(), InSegment("v"), InSegment("k")
    assert parse("seen or in(v) and in(k)") == Or((s, And((v, k))))
    assert parse("seen and in(v) or in(k)") == Or((And((s, v)), k))
    assert parse("not seen and in(v)") == And((Not(s), v))
    assert parse("not seen or in(v)") == Or((Not(s), v))
    assert parse("not not seen") == Not(Not(s))
    assert parse("not (seen and in(v))") == Not(And((s, v)))
    assert parse("(seen or in(v)) and in(k)") == And((Or((s, v)), k))


def test_chains_are_flat_and_parentheses_nest():
    s, v, k = Seen(), InSegment("v"), InSegment("k")
    assert parse("seen and in(v) and in(k)") == And((s, v, k))
    assert parse("seen or in(v) or in(k)") == Or((s, v, k))
    assert parse("(seen and in(v)) and in(k)") == And((And((s, v)), k))
    assert parse("seen and (in(v) and in(k))") == And((s, And((v, k))))
    assert parse("((seen))") == s


def test_parenthesised_values_and_conditions():
    assert parse("(trait.x) == 1") == eq(Trait("x"), Num(1))
    assert parse("((count(a))) >= 1") == did("a")
    assert parse("(count(a) >= 1)") == did("a")
    assert parse("(count(a) >= 1) and (seen)") == And((did("a"), Seen()))


def test_keywords_are_lower_case():
    with pytest.raises(RuleError) as e:
        parse("seen AND in(v)")
    assert e.value.reason == ("unexpected `AND` after a complete rule (conditions are joined "
                              "with `and` / `or`)")


# =========================================================================== durations
@pytest.mark.parametrize("text, ms", [
    ("1ms", 1), ("250ms", 250), ("1s", 1000), ("90s", 90_000), ("1m", 60_000), ("5m", 300_000),
    ("1h", 3_600_000), ("36h", 36 * 3_600_000), ("1d", 86_400_000), ("90d", 90 * 86_400_000),
    ("1w", 604_800_000), ("52w", 52 * 604_800_000),
])
def test_duration_units(text, ms):
    assert parse(f"count(a, {text}) > 0") == Compare(">", count("a", None, ms), Num(0))
    assert parse_duration(text) == ms
    assert parse(f"inactive({text})") == Inactive(ms)
    assert parse(f"abandoned(a, b, {text})") == Abandoned("a", "b", ms)


def test_duration_text_uses_the_largest_whole_unit():
    assert to_text(Inactive(7 * D)) == "inactive(1w)"
    assert to_text(Inactive(90 * D)) == "inactive(90d)"
    assert to_text(Inactive(90_000)) == "inactive(90s)"
    assert to_text(Inactive(1500)) == "inactive(1500ms)"
    assert to_text(Abandoned("a", "b", 0)) == "abandoned(a, b, 0ms)"
    assert to_text(ge(Now(), Arith("+", LastSeen(), Dur(-H)))) == "now >= last_seen + -1h"


def test_window_all_and_none_are_the_same():
    assert parse("count(a, all) >= 1") == parse("count(a) >= 1") == parse("did(a)")
    assert to_text(parse("count(a, all) >= 1")) == "count(a) >= 1"


def test_parse_duration():
    assert parse_duration(" 90d ") == 90 * D
    assert parse_duration(0) == 0
    assert parse_duration(250) == 250
    for bad in ("90", "d", "1.5h", "-1d", "1y", "", "1 d x"):
        with pytest.raises(RuleError, match="is not a duration"):
            parse_duration(bad)
    with pytest.raises(RuleError, match="out of range"):
        parse_duration(MAX_TIME_MS)
    with pytest.raises(RuleError, match="out of range"):
        parse_duration(-1)
    for bad in (True, 1.5, None):
        with pytest.raises(RuleError, match="a duration must be a string"):
            parse_duration(bad)


def test_longest_duration():
    ms = MAX_TIME_MS - 1
    assert parse(f"count(a, {ms}ms) > 0") == Compare(">", count("a", None, ms), Num(0))


# =========================================================================== strings
@pytest.mark.parametrize("literal, value", [
    (r'""', ""),
    (r'"plain"', "plain"),
    (r'"a\"b"', 'a"b'),
    (r'"a\\b"', "a\\b"),
    (r'"\n\t\r"', "\n\t\r"),
    (r'"\/"', "/"),
    (r'"\b\f"', "\b\f"),
    (r'"\u00e9\u0001"', "\u00e9\u0001"),
    (r'"\ud83d\ude00"', "\U0001F600"),
    ('"é 😀 \u2028"', "é 😀 \u2028"),
    ('"and or not"', "and or not"),
])
def test_string_escapes(literal, value):
    assert parse(f"trait.x == {literal}") == eq(Trait("x"), Str(value))


def test_every_character_round_trips_through_text():
    s = "".join(chr(c) for c in range(0, 0x250)) + "\u2028\u2029\ufeff😀"
    node = eq(Trait("x"), Str(s))
    assert parse(to_text(node)) == node
    node = StrTest("startswith", Trait("x"), s)
    assert parse(to_text(node)) == node
    node = InList(Trait("x"), (s, "", "\\"))
    assert parse(to_text(node)) == node


# =========================================================================== numbers
@pytest.mark.parametrize("literal, value", [
    ("0", 0), ("3", 3), ("-3", -3), ("12345678901234567890123", 12345678901234567890123),
    ("0.7", 0.7), (".5", 0.5), ("5.", 5.0), ("-0.25", -0.25), ("1e3", 1000.0), ("1E3", 1000.0),
    ("2.5e-3", 0.0025), ("-1.5e+2", -150.0),
])
def test_numbers(literal, value):
    node = parse(f"score.x >= {literal}")
    assert node == ge(Score("x"), Num(value))
    assert type(node.right.value) is type(value)


def test_integers_stay_integers_and_floats_floats():
    assert type(parse("count(a) >= 3").right.value) is int
    assert type(parse("count(a) >= 3.0").right.value) is float
    assert type(parse("trait.x in [1, 1.0]").items[1]) is float


@pytest.mark.parametrize("value", [0.1, 1e16, 1e-7, 123.456, 2.0 ** 60, -1e300, 5e-324])
def test_floats_round_trip_through_text(value):
    node = ge(Score("x"), Num(value))
    assert parse(to_text(node)) == node


def test_negative_numbers_in_arithmetic():
    assert parse("count(a) - -1 > 0") == Compare(">", Arith("-", count("a"), Num(-1)), Num(0))
    assert parse("now + -7d < first_seen") == Compare("<", Arith("+", Now(), Dur(-7 * D)),
                                                      FirstSeen())


# =========================================================================== text round trip
ROUND_TRIP = [t for t, _ in DESIGN_SECTION_1 + DESIGN_SECTION_3 + CONSTRUCTS] + [
    "seen or in(v) and not in(k)",
    "(seen or in(v)) and not (in(k) or bucket(1, 2))",
    "not (not seen)",
    "(seen and in(a)) and (in(b) and in(c))",
    "(seen or in(a)) or in(b)",
    "count(a where (x == 1 or y == 2) and z == 3, 3d) > 1",
    "count(a where not (x == 1 and y == 2)) > 1",
    "count(a) - (count(b) - (count(c) + 1)) > 0",
    'trait.name == "quote \\" backslash \\\\ newline \\n tab \\t"',
    "now - first(a) - 1d >= last(b) - first(a) - 2h + 30m",
    "sum(purchase.amount where currency in [\"EUR\", \"SEK\"] and amount > 0, 30d) >= 1e3",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_to_text_round_trip(text):
    ast = parse(text)
    rendered = to_text(ast)
    assert parse(rendered) == ast
    assert to_text(parse(rendered)) == rendered   # text is canonical: a fixed point


def test_to_text_canonical_forms():
    assert to_text(parse("did(a, 3d)  and not   seen")) == "count(a, 3d) >= 1 and not seen"
    assert to_text(parse("(seen and seen) and seen")) == "(seen and seen) and seen"
    assert to_text(parse("seen or seen and seen")) == "seen or seen and seen"
    assert to_text(parse("(seen or seen) and seen")) == "(seen or seen) and seen"
    assert to_text(parse("not (seen or seen)")) == "not (seen or seen)"
    assert to_text(parse("count(a) - (1 - 2) > 0")) == "count(a) - (1 - 2) > 0"
    assert to_text(parse("(count(a) - 1) - 2 > 0")) == "count(a) - 1 - 2 > 0"
    assert to_text(parse('count(a where x == "s", 60s) > 0')) == \
        'count(a where x == "s", 1m) > 0'


# =========================================================================== JSON
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_json_round_trip(text):
    ast = parse(text)
    data = to_json(ast)
    assert from_json(data) == ast
    assert from_json(data.decode()) == ast
    assert from_json(json.loads(data)) == ast


def test_json_shape():
    assert to_json(parse("seen")) == b'{"kind":"seen"}'
    assert json.loads(to_json(parse("count(a where x == 1, 1d) >= 2 and in(v)"))) == {
        "kind": "and",
        "items": [
            {"kind": "compare", "op": ">=",
             "left": {"kind": "agg", "fn": "count", "event": "a", "prop": None,
                      "where": {"kind": "compare", "op": "==",
                                "left": {"kind": "prop", "name": "x"},
                                "right": {"kind": "num", "value": 1}},
                      "window_ms": 86_400_000},
             "right": {"kind": "num", "value": 2}},
            {"kind": "insegment", "name": "v"},
        ],
    }


def test_json_optional_fields_default():
    doc = {"kind": "compare", "op": ">=", "left": {"kind": "agg", "fn": "count", "event": "a"},
           "right": {"kind": "num", "value": 1}}
    assert from_json(doc) == did("a")
    assert from_json({"kind": "abandoned", "a": "x", "b": "y", "within_ms": 5}) == \
        Abandoned("x", "y", 5)


def _cmp_doc(left, right=None, op=">="):
    return {"kind": "compare", "op": op, "left": left,
            "right": right or {"kind": "num", "value": 1}}


PROP_X = {"kind": "prop", "name": "x"}
TRAIT_X = {"kind": "trait", "name": "x"}
HOSTILE_JSON = [
    # (document, reason, path)
    ({"kind": "bogus"}, "invalid rule JSON: Invalid value 'bogus'", "$.kind"),
    ({"kind": "num", "value": 1}, "invalid rule JSON: Invalid value 'num'", "$.kind"),
    ({"kind": "not", "item": {"kind": "trait", "name": "x"}},
     "invalid rule JSON: Invalid value 'trait'", "$.item.kind"),
    ({"kind": "and", "items": [{"kind": "seen"}, {"kind": "num", "value": 1}]},
     "invalid rule JSON: Invalid value 'num'", "$.items[1].kind"),
    ({"kind": "bucket", "lo": "0", "hi": 5},
     "invalid rule JSON: Expected `int`, got `str`", "$.lo"),
    ({"kind": "compare", "op": ">=", "left": TRAIT_X},
     "invalid rule JSON: Object missing required field `right`", "$"),
    ({"kind": "compare", "op": ">=", "left": TRAIT_X, "right": {"kind": "num", "value": True}},
     "invalid rule JSON: Expected `int | float`, got `bool`", "$.right.value"),
    ({"kind": "inactive", "window_ms": 5, "windw": 1},
     "invalid rule JSON: Object contains unknown field `windw`", "$"),
    ({"kind": "not", "item": {"kind": "inactive", "window_ms": 5, "window": 1}},
     "invalid rule JSON: Object contains unknown field `window`", "$.item"),
    (_cmp_doc(TRAIT_X, op="=~"), "unknown comparison `=~`", "$"),
    ({"kind": "not", "item": _cmp_doc(PROP_X, op="==")},
     "property `x` is only available inside `where`", "$.item.left"),
    ({"kind": "and", "items": [{"kind": "seen"}, _cmp_doc(TRAIT_X, PROP_X)]},
     "property `x` is only available inside `where`", "$.items[1].right"),
    (_cmp_doc({"kind": "agg", "fn": "cnt", "event": "a"}),
     "unknown aggregate `cnt` (did you mean `count`?)", "$.left"),
    (_cmp_doc({"kind": "agg", "fn": "median", "event": "a", "prop": "v"}),
     "unknown aggregate `median` (did you mean `min`?)", "$.left"),
    (_cmp_doc({"kind": "agg", "fn": "sum", "event": "a"}), "`sum` needs a property", "$.left"),
    (_cmp_doc({"kind": "agg", "fn": "count", "event": "a", "prop": "v"}),
     "`count` takes no property", "$.left"),
    (_cmp_doc({"kind": "agg", "fn": "count", "event": "a", "window_ms": 0}),
     "a window must be longer than 0", "$.left"),
    (_cmp_doc({"kind": "agg", "fn": "count", "event": "a", "where": {"kind": "seen"}}),
     "only property tests are allowed inside `where`", "$.left.where"),
    (_cmp_doc({"kind": "agg", "fn": "count", "event": "a",
               "where": _cmp_doc(TRAIT_X, op="==")}),
     "inside `where`, only event properties and constants can be compared",
     "$.left.where.left"),
    (_cmp_doc({"kind": "arith", "op": "*", "left": {"kind": "agg", "fn": "count", "event": "a"},
               "right": {"kind": "num", "value": 2}}), "unknown operator `*`", "$.left"),
    ({"kind": "strtest", "op": "matches", "value": TRAIT_X, "pattern": "("},
     "bad regular expression: missing ), unterminated subpattern at position 0", "$"),
    ({"kind": "strtest", "op": "endswith", "value": TRAIT_X, "pattern": "x"},
     "unknown string test `endswith`", "$"),
    ({"kind": "and", "items": [{"kind": "seen"}]}, "`and` needs at least two conditions", "$"),
    ({"kind": "or", "items": []}, "`or` needs at least two conditions", "$"),
    ({"kind": "bucket", "lo": 7, "hi": 5}, "bucket(7, 5) needs 0 <= lo <= hi <= 9999", "$"),
    ({"kind": "inactive", "window_ms": 0}, "inactive() needs a duration longer than 0", "$"),
    ({"kind": "abandoned", "a": "x", "b": "y", "within_ms": -1},
     "abandoned() needs a duration of 0 or more", "$"),
    (_cmp_doc(TRAIT_X, {"kind": "agg", "fn": "count", "event": "a"}, op="=="),
     "a trait can only be compared with constants (`trait.x >= 18`)", "$"),
    (_cmp_doc({"kind": "num", "value": 1}), "this comparison has only constants; it is always "
     "true or always false", "$"),
    (_cmp_doc({"kind": "now"}), "a comparison with `now` must compare an age, as in "
     "`last_seen < now - 7d` or `now - first(purchase) > 30d`", "$"),
    ({"kind": "exists", "value": {"kind": "agg", "fn": "count", "event": "a"}},
     "`exists` applies to an event property, a trait or a score", "$"),
    (_cmp_doc(TRAIT_X, {"kind": "num", "value": float("inf")}),
     "numbers must be finite", "$.right"),
]


@pytest.mark.parametrize("doc, reason, path", HOSTILE_JSON,
                         ids=[f"{i}-{r[:30]}" for i, (_, r, _) in enumerate(HOSTILE_JSON)])
def test_hostile_json(doc, reason, path):
    with pytest.raises(RuleError) as e:
        from_json(doc, segment="s")
    assert (e.value.reason, e.value.path, e.value.segment) == (reason, path, "s")
    assert e.value.line is None and e.value.column is None
    assert str(e.value) == f"{reason} - at `{path}` of `s`"
    if "inf" not in repr(doc):   # JSON has no infinity
        with pytest.raises(RuleError) as e2:   # same through bytes
            from_json(json.dumps(doc).encode(), segment="s")
        assert (e2.value.reason, e2.value.path) == (reason, path)


@pytest.mark.parametrize("data, reason, path", [
    (b"[1]", "invalid rule JSON: Expected `object`, got `array`", "$"),
    (b"null", "invalid rule JSON: Expected `object`, got `null`", "$"),
    (b"{", "invalid rule JSON: Input data was truncated", None),
    (b"", "invalid rule JSON: Input data was truncated", None),
    (b'{"kind": "seen"} x', "invalid rule JSON: JSON is malformed: trailing characters "
                            "(byte 18)", None),
])
def test_malformed_json(data, reason, path):
    with pytest.raises(RuleError) as e:
        from_json(data)
    assert (e.value.reason, e.value.path) == (reason, path)


def test_json_errors_are_value_errors_too():
    with pytest.raises(ValueError):
        from_json(b'{"kind": "bogus"}')


# =========================================================================== parse errors
ERRORS = [
    # (text, kwargs, reason, line, column)
    ("cnt(purchase) >= 1", {}, "unknown function `cnt` (did you mean `count`?)", 1, 1),
    ("seen and sun(purchase.amount) > 1", {}, "unknown function `sun` (did you mean `sum`?)",
     1, 10),
    ("count(purchse, 90d) >= 3", {"event_types": ["purchase", "product_view"]},
     "unknown event type `purchse` (did you mean `purchase`?)", 1, 7),
    ("count(refund) >= 1", {"event_types": ["purchase", "product_view"]},
     "unknown event type `refund`", 1, 7),
    ("abandoned(add_to_cart, purchases, 1h)", {"event_types": ["add_to_cart", "purchase"]},
     "unknown event type `purchases` (did you mean `purchase`?)", 1, 24),
    ("in(frequent_buyer)", {"segments": ["frequent_buyers", "vip"]},
     "unknown segment `frequent_buyer` (did you mean `frequent_buyers`?)", 1, 4),
    ("seen and not in(zzz)", {"segments": ["frequent_buyers", "vip"]},
     "unknown segment `zzz`", 1, 17),
    ("count(purchase, 90d >= 3", {}, "expected `)` to close `count(`, found `>=`", 1, 21),
    ("(seen and in(v)", {}, "expected `)`, found end of rule", 1, 16),
    ("(count(a) >= 1", {}, "expected `)`, found end of rule", 1, 15),
    ("in(v", {}, "expected `)`, found end of rule", 1, 5),
    ("count(a, 5) >= 1", {}, "`5` needs a unit (ms, s, m, h, d or w), such as `5d`", 1, 10),
    ("inactive(30)", {}, "`30` needs a unit (ms, s, m, h, d or w), such as `30d`", 1, 10),
    ("count(a, 5y) >= 1", {}, "`5` needs a unit (ms, s, m, h, d or w), such as `5d`", 1, 10),
    ("count(a, x) >= 1", {}, "expected a duration such as `7d` or `all`, found `x`", 1, 10),
    ('trait.x == "abc', {}, "unterminated string", 1, 12),
    ('trait.x == "a\\q"', {}, "unknown escape `\\q` in string", 1, 14),
    ('trait.x == "\\u12"', {}, "`\\u` needs four hex digits", 1, 13),
    ('trait.x matches "("', {},
     "bad regular expression: missing ), unterminated subpattern at position 0", 1, 17),
    ("now > 5", {}, "a comparison with `now` must compare an age, as in `last_seen < now - 7d` "
     "or `now - first(purchase) > 30d`", 1, 1),
    ("now - now > 1d", {}, "`now` must appear exactly once in a comparison", 1, 1),
    ("seen and first_seen >= now - 1.5", {},
     "a comparison with `now` may only use first_seen, last_seen, first(E), last(E), durations "
     "and whole numbers (as in `first_seen >= now - 7d`)", 1, 10),
    ("first_seen between now - 2d and 1d", {},
     "`now` cannot be used with `between`; write two comparisons", 1, 1),
    ("count(a) >= now - 1d", {},
     "a comparison with `now` may only use first_seen, last_seen, first(E), last(E), durations "
     "and whole numbers (as in `first_seen >= now - 7d`)", 1, 1),
    ("trait.x == count(a)", {},
     "a trait can only be compared with constants (`trait.x >= 18`)", 1, 1),
    ("trait.x == trait.y", {}, "a test can use only one trait", 1, 1),
    ("now - first_seen > 1d + 2.5", {},
     "a comparison with `now` may only use first_seen, last_seen, first(E), last(E), durations "
     "and whole numbers (as in `first_seen >= now - 7d`)", 1, 1),
    ("trait.x + 1 == 2", {}, "a trait test compares one trait with constants", 1, 1),
    ("category == 1", {}, "unknown name `category` (event properties are only available "
     "inside `where`; traits are `trait.NAME`)", 1, 1),
    ("count(a where trait.x == 1) >= 1", {}, "inside `where`, only event properties and "
     "constants can be compared; found `trait`", 1, 15),
    ("count(a where x == count(b)) >= 1", {}, "inside `where`, only event properties and "
     "constants can be compared; found `count`", 1, 20),
    ("count(a where x == y) >= 1", {}, "a `where` test compares one property with constants",
     1, 15),
    ("count(a where x == 1 where y == 1) >= 1", {},
     "expected `)` to close `count(`, found `where`", 1, 22),
    ("seen seen", {}, "unexpected `seen` after a complete rule (conditions are joined with "
     "`and` / `or`)", 1, 6),
    ("seen )", {}, "unexpected `)` after a complete rule", 1, 6),
    ("count(a) >= 1 2", {}, "unexpected `2` after a complete rule (conditions are joined with "
     "`and` / `or`)", 1, 15),
    ("", {}, "empty rule", 1, 1),
    ("  \n  ", {}, "empty rule", 2, 3),
    ("seen and\n  count(purchse) >= 1", {"event_types": ["purchase"]},
     "unknown event type `purchse` (did you mean `purchase`?)", 2, 9),
    ("seen and\n  cont(a) >= 1 and\n\tin(x)", {}, "unknown function `cont` (did you mean "
     "`count`?)", 2, 3),
    ("seen\nand\nin(x) in(y)", {}, "unexpected `in` after a complete rule (conditions are "
     "joined with `and` / `or`)", 3, 7),
    ('trait.x ==\n"abc', {}, "unterminated string", 2, 1),
    ("count(a) >= 1 and", {}, "expected a value, found end of rule", 1, 18),
    ("count(a)", {}, "expected a comparison (== != < <= > >=, in, between, …) after the value, "
     "found end of rule", 1, 9),
    ("count(a.b) >= 1", {}, "`count` counts events and takes no property (`count(a)`, or "
     "`distinct(a.prop)`)", 1, 8),
    ("sum(a) >= 1", {}, "`sum` needs a property, as in `sum(a.amount)`", 1, 6),
    ("bucket(5, 1)", {}, "bucket(5, 1) needs 0 <= lo <= hi <= 9999", 1, 1),
    ("seen and bucket(0, 10000)", {}, "bucket(0, 10000) needs 0 <= lo <= hi <= 9999", 1, 10),
    ("bucket(0, 1.5)", {}, "expected an integer for bucket's high end, found `1.5`", 1, 11),
    ("inactive(0d)", {}, "inactive() needs a duration longer than 0", 1, 1),
    ("inactive(all)", {}, "expected a duration such as `7d`, found `all`", 1, 10),
    ("count(a, 0d) >= 1", {}, "a window must be longer than 0", 1, 10),
    ("count(a, 300000000000000w) > 1", {},
     "duration `300000000000000w` is too long (at most 2**48 ms)", 1, 10),
    ("1 == 1", {}, "this comparison has only constants; it is always true or always false",
     1, 1),
    ("trait.x == @", {}, "unexpected character `@`", 1, 12),
    ("trait.x in [seen]", {}, "list items must be numbers or strings, found `seen`", 1, 13),
    ("trait.x in [1, 2", {}, "expected `]` to close the list, found end of rule", 1, 17),
    ("trait.x contains 1", {}, "`contains` takes a string, found `1`", 1, 18),
    ('count(a) contains "x"', {},
     "`contains` applies to an event property, a trait or a score", 1, 1),
    ("trait == 1", {}, "expected `.` and a name after `trait` (as in `trait.x`)", 1, 7),
    ("abandoned(a, b)", {}, "expected `,`, found `)`", 1, 15),
    ("abandoned(a, b, 1h) by", {}, "expected a property name after `by`, found end of rule",
     1, 23),
    ("count(and) > 1", {}, "expected an event type, found keyword `and`", 1, 7),
    ("not", {}, "expected a value, found end of rule", 1, 4),
    ('trait.x == "a" + "b"', {}, "strings cannot be added or subtracted", 1, 1),
    ("count(a) > -b", {}, "unary minus is only allowed before a number", 1, 12),
    ("trait.x not 5", {}, "expected `in` after `not`, found `5`", 1, 13),
    ("trait.x between 1 or 2", {}, "expected `and` in `between … and …`, found `or`", 1, 19),
    ("in(1)", {}, "expected a segment name, found `1`", 1, 4),
    ('trait.x == "\\ud83d"', {}, "unpaired surrogate in `\\u` escape", 1, 12),
    ("score.x exists and", {}, "expected a value, found end of rule", 1, 19),
]


@pytest.mark.parametrize("text, kwargs, reason, line, column", ERRORS,
                         ids=[t.replace("\n", "\\n") for t, *_ in ERRORS])
def test_parse_errors(text, kwargs, reason, line, column):
    with pytest.raises(RuleError) as e:
        parse(text, segment="seg", **kwargs)
    err = e.value
    assert (err.reason, err.line, err.column) == (reason, line, column)
    assert err.segment == "seg" and err.path is None
    assert str(err) == f"{reason} - at line {line}, column {column} of `seg`"


def test_error_message_format_of_the_style_guide():
    with pytest.raises(RuleError) as e:
        parse("count(purchse, 90d) >= 3", segment="frequent_buyers",
              event_types={"purchase", "app_open"})
    assert str(e.value) == ("unknown event type `purchse` (did you mean `purchase`?) - at "
                            "line 1, column 7 of `frequent_buyers`")
    assert isinstance(e.value, ValueError)


def test_error_without_segment():
    with pytest.raises(RuleError) as e:
        parse("seen seen")
    assert str(e.value) == ("unexpected `seen` after a complete rule (conditions are joined "
                            "with `and` / `or`) - at line 1, column 6")
    assert e.value.segment is None


def test_with_segment_keeps_the_location():
    err = RuleError("boom", line=2, column=3).with_segment("s")
    assert (err.reason, err.line, err.column, err.segment) == ("boom", 2, 3, "s")
    assert str(err) == "boom - at line 2, column 3 of `s`"
    assert str(RuleError("boom", segment="s")) == "boom - in `s`"


@pytest.mark.parametrize("rule", [None, 5, b"seen", Seen()])
def test_rule_must_be_text(rule):
    with pytest.raises(RuleError, match="a rule must be a string"):
        parse(rule)


def test_known_names_pass():
    ast = parse("count(a) >= 1 and in(s)", segments=["s"], event_types=("a",))
    assert ast == And((did("a"), InSegment("s")))
    # without the lists, any name is fine
    assert parse("in(anything)") == InSegment("anything")


def test_no_did_you_mean_without_a_close_name():
    with pytest.raises(RuleError) as e:
        parse("xyzzy(a) > 1")
    assert e.value.reason == "unknown function `xyzzy`"


# =========================================================================== references, topo
def test_references():
    ast = parse("in(a) and (not in(b) or in(a)) and count(x where y == 1) > 0 and not in(c)")
    assert references(ast) == ["a", "b", "c"]
    assert references(parse("seen")) == []


def test_parse_full_positions_of_references():
    p = parse_full("in(a) and\n  not in(bb)", segment="s")
    assert p.ast == And((InSegment("a"), Not(InSegment("bb"))))
    assert p.refs == (("a", 1, 4), ("bb", 2, 10))
    assert p.text == "in(a) and\n  not in(bb)"


def test_topo_order_puts_references_first_otherwise_definition_order():
    assert topo_order({}) == []
    assert topo_order({"a": [], "b": [], "c": []}) == ["a", "b", "c"]
    assert topo_order({"c": ["a"], "a": ["b"], "b": []}) == ["b", "a", "c"]
    assert topo_order({"x": [], "top": ["mid", "x"], "mid": ["low"], "low": [], "z": []}) == \
        ["x", "low", "mid", "top", "z"]
    # a diamond: each segment once
    assert topo_order({"d": ["b", "c"], "b": ["a"], "c": ["a"], "a": []}) == ["a", "b", "c", "d"]
    # references to names outside the set are not this function's business
    assert topo_order({"a": ["elsewhere"]}) == ["a"]


@pytest.mark.parametrize("deps, message, segment", [
    ({"a": ["a"]}, "segments reference each other in a cycle: `a` -> `a`", "a"),
    ({"a": ["b"], "b": ["a"]}, "segments reference each other in a cycle: `a` -> `b` -> `a`",
     "a"),
    ({"ok": [], "x": ["y"], "y": ["z"], "z": ["x"]},
     "segments reference each other in a cycle: `x` -> `y` -> `z` -> `x`", "x"),
    ({"top": ["loop1"], "loop1": ["loop2"], "loop2": ["loop1"]},
     "segments reference each other in a cycle: `loop1` -> `loop2` -> `loop1`", "loop1"),
])
def test_topo_order_names_the_cycle(deps, message, segment):
    with pytest.raises(RuleError) as e:
        topo_order(deps)
    assert e.value.reason == message
    assert e.value.segment == segment
    assert str(e.value) == f"{message} - in `{segment}`"


def test_topo_order_from_parsed_rules():
    rules = {"vip_se": 'in(vip) and trait.country == "SE"', "vip": "in(buyers) and score.ltv > 9",
             "buyers": "count(purchase) >= 1"}
    deps = {name: references(parse(text)) for name, text in rules.items()}
    assert topo_order(deps) == ["buyers", "vip", "vip_se"]


# =========================================================================== builder
BUILDER = [
    (lambda: b.count("purchase", "90d") >= 3, "count(purchase, 90d) >= 3"),
    (lambda: b.sum("purchase", "amount") >= 500, "sum(purchase.amount) >= 500"),
    (lambda: b.count("product_view", "7d", where=b.prop("category") == "shoes") >= 3,
     'count(product_view where category == "shoes", 7d) >= 3'),
    (lambda: (b.count("product_view", "7d", where=b.prop("category") == "shoes") >= 3)
     & ~b.did("purchase", "30d"),
     'count(product_view where category == "shoes", 7d) >= 3 and not did(purchase, 30d)'),
    (lambda: b.count("app_open", "7d") >= 5, "count(app_open, 7d) >= 5"),
    (lambda: b.did("support_ticket", "3d"), "did(support_ticket, 3d)"),
    (lambda: b.did("support_ticket", "3d"), "count(support_ticket, 3d) >= 1"),
    (lambda: b.seen & b.inactive("30d"), "seen and inactive(30d)"),
    (lambda: (b.count("email_open", "30d") >= 3) & (b.count("email_click", "30d") == 0),
     "count(email_open, 30d) >= 3 and count(email_click, 30d) == 0"),
    (lambda: b.abandoned("add_to_cart", "purchase", "1h"),
     "abandoned(add_to_cart, purchase, 1h)"),
    (lambda: b.abandoned("add_to_cart", "purchase", "1h", by="cart_id"),
     "abandoned(add_to_cart, purchase, 1h) by cart_id"),
    (lambda: b.first_seen >= b.now - "7d", "first_seen >= now - 7d"),
    (lambda: b.first_seen >= b.now - b.dur("7d"), "first_seen >= now - 7d"),
    (lambda: b.first_seen >= b.now - timedelta(days=7), "first_seen >= now - 7d"),
    (lambda: (b.trait("country") == "SE") & b.in_("frequent_buyers"),
     'trait.country == "SE" and in(frequent_buyers)'),
    (lambda: (b.score("churn") >= 0.7) & b.in_("high_ltv"),
     "score.churn >= 0.7 and in(high_ltv)"),
    (lambda: b.bucket(0, 999), "bucket(0, 999)"),
    (lambda: b.count("product_view", "2d", where=b.prop("category").isin([3, 4])) >= 4,
     "count(product_view where category in [3, 4], 2d) >= 4"),
    (lambda: b.sum("purchase", "amount", "30d", where=b.prop("currency") == "EUR") > 200,
     'sum(purchase.amount where currency == "EUR", 30d) > 200'),
    (lambda: (b.trait("country") == "SE") & ~b.in_("vip"),
     'trait.country == "SE" and not in(vip)'),
    # every aggregate and window form
    (lambda: b.count("a", "all") > 0, "count(a, all) > 0"),
    (lambda: b.count("a", None) > 0, "count(a) > 0"),
    (lambda: b.count("a", 3_600_000) > 0, "count(a, 1h) > 0"),
    (lambda: b.count("a", b.dur("1h")) > 0, "count(a, 1h) > 0"),
    (lambda: b.count("a", timedelta(minutes=90)) > 0, "count(a, 90m) > 0"),
    (lambda: b.avg("a", "v") < 2.5, "avg(a.v) < 2.5"),
    (lambda: b.min("a", "v", where=b.prop("k") != "x") <= 0, 'min(a.v where k != "x") <= 0'),
    (lambda: b.max("a", "v", "2w") >= 10, "max(a.v, 2w) >= 10"),
    (lambda: b.distinct("a", "sku", "30d") >= 3, "distinct(a.sku, 30d) >= 3"),
    (lambda: b.did("a", where=b.prop("x") > 1), "did(a where x > 1)"),
    (lambda: b.did("a"), "did(a)"),
    # time values
    (lambda: b.last_seen < b.now - "1d", "last_seen < now - 1d"),
    (lambda: b.now - b.last("purchase") > "30d", "now - last(purchase) > 30d"),
    (lambda: b.now - b.last("purchase") > b.dur("30d"), "now - last(purchase) > 30d"),
    (lambda: b.first("signup") >= b.now - "2h", "first(signup) >= now - 2h"),
    (lambda: b.now - b.first_seen > b.dur("1d") + "2h", "now - first_seen > 1d + 2h"),
    (lambda: b.first_seen >= b.now + -b.dur("7d"), "first_seen >= now + -7d"),
    (lambda: "7d" + b.first_seen >= b.now, "7d + first_seen >= now"),
    # trait / score tests
    (lambda: b.trait("age") != 18, "trait.age != 18"),
    (lambda: b.trait("plan").isin(["pro", "team"]), 'trait.plan in ["pro", "team"]'),
    (lambda: b.trait("plan").isin(("pro", "team")), 'trait.plan in ["pro", "team"]'),
    (lambda: b.trait("plan").not_in(["free"]), 'trait.plan not in ["free"]'),
    (lambda: b.trait("plan").isin([]), "trait.plan in []"),
    (lambda: b.trait("x").isin([1, -2, 2.5, "a", b.dur("1h")]),
     'trait.x in [1, -2, 2.5, "a", 1h]'),
    (lambda: b.trait("age").between(18, 30), "trait.age between 18 and 30"),
    (lambda: b.score("ltv").between(-1, 2.5), "score.ltv between -1 and 2.5"),
    (lambda: b.trait("email").contains("@"), 'trait.email contains "@"'),
    (lambda: b.trait("email").startswith("a"), 'trait.email startswith "a"'),
    (lambda: b.trait("email").matches(r"^[a-z]+@x\.com$"),
     'trait.email matches "^[a-z]+@x\\\\.com$"'),
    (lambda: b.trait("email").exists(), "trait.email exists"),
    (lambda: ~b.trait("email").exists(), "not trait.email exists"),
    (lambda: b.trait("name") == 'a "b" \\ \n', 'trait.name == "a \\"b\\" \\\\ \\n"'),
    (lambda: b.trait("code") == "7d", 'trait.code == "7d"'),
    # where with every test, nested logic
    (lambda: b.count("a", where=b.prop("x").not_in([1])) > 0, "count(a where x not in [1]) > 0"),
    (lambda: b.count("a", where=b.prop("x").between(1, 2)) > 0,
     "count(a where x between 1 and 2) > 0"),
    (lambda: b.count("a", where=b.prop("url").contains("/p/")) > 0,
     'count(a where url contains "/p/") > 0'),
    (lambda: b.count("a", where=~b.prop("coupon").exists()
                     & ((b.prop("x") == 1) | (b.prop("y") == 2))) > 0,
     "count(a where not coupon exists and (x == 1 or y == 2)) > 0"),
    (lambda: b.count("a", where=(b.prop("seen") == 1) & (b.prop("count") == 2)) > 0,
     "count(a where seen == 1 and count == 2) > 0"),
    # logic: flattening and precedence
    (lambda: b.seen | b.in_("v") & ~b.in_("k"), "seen or in(v) and not in(k)"),
    (lambda: (b.seen | b.in_("v")) & b.in_("k"), "(seen or in(v)) and in(k)"),
    (lambda: b.seen & b.in_("a") & b.in_("b") & b.in_("c"),
     "seen and in(a) and in(b) and in(c)"),
    (lambda: b.seen | b.in_("a") | b.in_("b"), "seen or in(a) or in(b)"),
    (lambda: b.seen & (b.in_("a") & b.in_("b")), "seen and in(a) and in(b)"),
    (lambda: b.and_(b.seen, b.in_("a")) & b.in_("b"), "(seen and in(a)) and in(b)"),
    (lambda: b.seen & b.and_(b.in_("a"), b.in_("b")), "seen and (in(a) and in(b))"),
    (lambda: b.and_(b.seen & b.in_("a")) & b.in_("b"), "(seen and in(a)) and in(b)"),
    (lambda: b.or_(b.seen, b.in_("a")) | b.in_("b"), "(seen or in(a)) or in(b)"),
    (lambda: b.and_(b.seen, b.in_("a"), b.in_("b")), "seen and in(a) and in(b)"),
    (lambda: b.and_(b.seen), "seen"),
    (lambda: b.not_(b.not_(b.seen)), "not not seen"),
    (lambda: ~(b.seen & b.in_("a")), "not (seen and in(a))"),
    (lambda: ~b.seen & b.in_("a"), "not seen and in(a)"),
    (lambda: Seen() & b.in_("a"), "seen and in(a)"),          # raw AST nodes are accepted
    (lambda: b.in_("a") | InSegment("b"), "in(a) or in(b)"),
    # value arithmetic
    (lambda: b.count("a") + b.count("b") >= 3, "count(a) + count(b) >= 3"),
    (lambda: b.count("a") - 1 - 2 > 0, "count(a) - 1 - 2 > 0"),
    (lambda: b.count("a") - (b.lit(1) - 2) > 0, "count(a) - (1 - 2) > 0"),
    (lambda: b.count("a") - b.dur("1d") + 1 > 2, "count(a) - 1d + 1 > 2"),
    (lambda: 1 + b.count("a") > 2, "1 + count(a) > 2"),
    (lambda: 5 - b.count("a") > 2, "5 - count(a) > 2"),
    (lambda: b.lit(3) <= b.count("a"), "3 <= count(a)"),
    (lambda: 3 <= b.count("a"), "count(a) >= 3"),                 # Python reflects
    (lambda: b.score("a") >= b.score("b"), "score.a >= score.b"),
    (lambda: b.count("a") >= -3, "count(a) >= -3"),
    (lambda: b.count("a") >= -b.lit(3), "count(a) >= -3"),
    (lambda: b.count("a") >= 1e3, "count(a) >= 1e3"),
    # names that are keywords elsewhere
    (lambda: b.count("all", "all") > 0, "count(all, all) > 0"),
    (lambda: b.trait("and") == 1, "trait.and == 1"),
    (lambda: b.in_("where"), "in(where)"),
    (lambda: b.sum("a", "where") > 0, "sum(a.where) > 0"),
    (lambda: b.abandoned("a", "b", 0), "abandoned(a, b, 0ms)"),
    (lambda: b.inactive(1), "inactive(1ms)"),
]


@pytest.mark.parametrize("make, text", BUILDER, ids=[t for _, t in BUILDER])
def test_builder_equals_parser(make, text):
    cond = make()
    assert isinstance(cond, b.Cond)
    assert cond.node == parse(text)
    assert cond.text == to_text(parse(text))
    assert parse(cond.text) == cond.node
    assert str(cond) == cond.text
    assert repr(cond) == f"Cond({cond.text!r})"
    validate(cond.node)


def test_builder_values_have_node_and_text():
    v = b.now - b.last("purchase")
    assert v.node == Arith("-", Now(), Last("purchase"))
    assert v.text == "now - last(purchase)"
    assert repr(v) == "Value('now - last(purchase)')"
    assert b.count("a", "90d").text == "count(a, 90d)"
    assert b.trait("x").node == Trait("x")
    assert b.lit("SE").text == '"SE"'
    assert b.lit(b.lit(1)).node == Num(1)
    assert b.dur("1h").node == Dur(H)
    assert (-b.dur("1h")).node == Dur(-H)
    assert b.count("a", where=b.prop("x") == 1).node == count("a", eq(Prop("x"), Num(1)))


def test_builder_where_condition_is_its_own_condition():
    w = (b.prop("x") == 1) | b.prop("y").exists()
    assert w.text == "x == 1 or y exists"
    assert w.node == Or((eq(Prop("x"), Num(1)), Exists(Prop("y"))))
    assert (b.count("e", where=w) >= 1).node == parse("count(e where x == 1 or y exists) >= 1")


def test_builder_strings_are_durations_only_in_time_context():
    assert (b.trait("x") == "7d").node == eq(Trait("x"), Str("7d"))
    assert (b.now - b.first_seen > "7d").node.right == Dur(7 * D)
    with pytest.raises(RuleError, match="a number cannot be compared with a string"):
        b.first_seen > b.lit("7d")
    assert (b.score("x") + "1h").node == Arith("+", Score("x"), Dur(H))
    assert b.first_seen.between("1d", "2d").node == Between(FirstSeen(), Dur(D), Dur(2 * D))
    with pytest.raises(RuleError, match="is not a duration"):
        b.now - b.first_seen > "a week"


def test_builder_accepts_numpy_like_numbers():
    import numpy as np
    assert (b.count("a") >= np.int64(3)).node == parse("count(a) >= 3")
    assert type((b.count("a") >= np.int64(3)).node.right.value) is int
    assert (b.score("a") >= np.float32(0.5)).node == parse("score.a >= 0.5")
    assert b.bucket(np.int32(0), np.int64(9)).node == Bucket(0, 9)


def test_builder_objects_are_immutable_and_unhashable_values():
    with pytest.raises(AttributeError):
        b.seen.node = Seen()
    with pytest.raises(AttributeError):
        b.now.node = Now()
    with pytest.raises(TypeError):
        hash(b.trait("x"))


BUILDER_ERRORS = [
    (lambda: b.count("purchase", "0d"), RuleError, "a window must be longer than 0"),
    (lambda: b.count("purchase", "90"), RuleError,
     "`90` is not a duration (expected an integer and a unit out of ms s m h d w, such as "
     "`90d`)"),
    (lambda: b.count("purchase", 2 ** 48), RuleError,
     "duration `281474976710656` is out of range (0 to 2**48 ms)"),
    (lambda: b.count("purchase", timedelta(microseconds=1500)), RuleError,
     "a window must be a whole number of milliseconds, got "
     "datetime.timedelta(microseconds=1500)"),
    (lambda: b.count("purchase", b.trait("x")), RuleError,
     "a window must be a duration, got `trait.x`"),
    (lambda: b.inactive("0s"), RuleError, "inactive() needs a duration longer than 0"),
    (lambda: b.inactive("all"), RuleError,
     "`all` is not a duration (expected an integer and a unit out of ms s m h d w, such as "
     "`90d`)"),
    (lambda: b.bucket(5, 1), RuleError, "bucket(5, 1) needs 0 <= lo <= hi <= 9999"),
    (lambda: b.bucket(0, 1.5), RuleError, "bucket() takes integers, got 1.5"),
    (lambda: b.bucket(True, 5), RuleError, "bucket() takes integers, got True"),
    (lambda: b.count("and"), RuleError, "an event type cannot be the keyword `and`"),
    (lambda: b.count("order completed"), RuleError,
     "an event type must be a name (letters, digits and `_`, not starting with a digit), "
     "got 'order completed'"),
    (lambda: b.first(""), RuleError, "an event type must be a name (letters, digits and `_`, "
     "not starting with a digit), got ''"),
    (lambda: b.sum("purchase", "30d"), RuleError, "a property must be a name (letters, digits "
     "and `_`, not starting with a digit), got '30d'"),
    (lambda: b.prop("trait"), RuleError, "a property cannot be the keyword `trait`"),
    (lambda: b.in_("my segment"), RuleError, "a segment must be a name (letters, digits and "
     "`_`, not starting with a digit), got 'my segment'"),
    (lambda: b.trait(3), RuleError, "a trait must be a name (letters, digits and `_`, not "
     "starting with a digit), got 3"),
    (lambda: b.trait("country") == b.count("purchase"), RuleError,
     "a trait can only be compared with constants (`trait.x >= 18`)"),
    (lambda: b.now > 5, RuleError, "a comparison with `now` must compare an age, as in "
     "`last_seen < now - 7d` or `now - first(purchase) > 30d`"),
    (lambda: b.lit(1) == 1, RuleError,
     "this comparison has only constants; it is always true or always false"),
    (lambda: b.prop("x") == b.prop("y"), RuleError,
     "a `where` test compares one property with constants"),
    (lambda: b.prop("x") == b.count("a"), RuleError,
     "inside `where`, only event properties and constants can be compared"),
    (lambda: b.count("a", where=b.seen) > 1, RuleError,
     "only property tests are allowed inside `where`"),
    (lambda: b.count("a", where=b.trait("x") == 1) > 1, RuleError,
     "inside `where`, only event properties and constants can be compared"),
    (lambda: (b.prop("x") == 1) & b.seen, RuleError,
     "`x == 1` tests event properties, which are only available inside `where`; it cannot be "
     "joined with `seen`"),
    (lambda: b.or_(b.in_("v"), b.prop("x").exists()), RuleError,
     "`x exists` tests event properties, which are only available inside `where`; it cannot "
     "be joined with `in(v)`"),
    (lambda: b.trait("x").matches("("), RuleError,
     "bad regular expression: missing ), unterminated subpattern at position 0"),
    (lambda: b.trait("x").contains(1), RuleError, "`contains` takes a string, got 1"),
    (lambda: b.count("a").exists(), RuleError,
     "`exists` applies to an event property, a trait or a score"),
    (lambda: (b.trait("x") + 1).isin([1]), RuleError,
     "`inlist` applies to a single property, trait or value"),
    (lambda: b.trait("x") == None, RuleError,  # noqa: E711
     "`None` is not a rule value; test presence with `.exists()` and absence with "
     "`~v.exists()`"),
    (lambda: b.trait("vip") == True, RuleError,  # noqa: E712
     "booleans are not rule values, got True (store flags as 1/0 or as strings)"),
    (lambda: b.score("x") > float("nan"), RuleError, "numbers must be finite, got nan"),
    (lambda: b.trait("x").isin([object]), RuleError,
     "cannot use type <class 'object'> in a rule"),
    (lambda: b.trait("x").isin([b.trait("y")]), RuleError,
     "list items must be numbers or strings, got `trait.y`"),
    (lambda: -b.count("a"), RuleError, "unary minus is only allowed before a number"),
    (lambda: b.trait("x") + "soon", RuleError, "`soon` is not a duration (expected an integer "
     "and a unit out of ms s m h d w, such as `90d`)"),
    (lambda: b.and_(), RuleError, "`and_` needs at least one condition"),
    (lambda: b.trait("x").isin("abc"), TypeError,
     "expected a list of numbers or strings, got 'abc'"),
    # Python pitfalls are caught, not silently wrong
    (lambda: b.count("a") >= 3 & b.seen, TypeError,
     "cannot join int 3 with `&`; if you wrote `a >= 3 & b`, parenthesise the comparison: "
     "`(a >= 3) & b`"),
    (lambda: b.count("a") >= 3 | b.seen, TypeError,
     "cannot join int 3 with `|`; if you wrote `a >= 3 | b`, parenthesise the comparison: "
     "`(a >= 3) | b`"),
    (lambda: b.seen and b.in_("v"), TypeError, segcore.build._NO_TRUTH),
    (lambda: not b.seen, TypeError, segcore.build._NO_TRUTH),
    (lambda: 1 < b.trait("x") < 5, TypeError, segcore.build._NO_TRUTH),
    (lambda: b.count("a") & b.seen, TypeError, "`count(a)` is a value, not a condition: "
     "compare it (`count(a) >= 1`) before joining it with `&`"),
    (lambda: b.trait("x") == b.seen, TypeError, "`seen` is a condition, not a value"),
]


@pytest.mark.parametrize("make, exc, message", BUILDER_ERRORS,
                         ids=[f"{i}-{m[:40]}" for i, (_, _, m) in enumerate(BUILDER_ERRORS)])
def test_builder_errors(make, exc, message):
    with pytest.raises(exc) as e:
        make()
    assert str(e.value) == message
    if exc is RuleError:
        assert (e.value.line, e.value.column, e.value.path, e.value.segment) == \
            (None, None, None, None)


def test_builder_error_and_parser_error_agree():
    for make, text in [
        (lambda: b.trait("country") == b.count("purchase"), "trait.country == count(purchase)"),
        (lambda: b.now > 5, "now > 5"),
        (lambda: b.trait("x").matches("(["), 'trait.x matches "(["'),
        (lambda: b.bucket(9, 3), "bucket(9, 3)"),
        (lambda: b.inactive("0d"), "inactive(0d)"),
        (lambda: b.count("a", "0s") >= 1, "count(a, 0s) >= 1"),
    ]:
        with pytest.raises(RuleError) as eb:
            make()
        with pytest.raises(RuleError) as ep:
            parse(text)
        assert eb.value.reason == ep.value.reason


# =========================================================================== hypothesis
_RESERVED_EVENT = {"and", "or", "not", "where", "in"}
_RESERVED_PROP = _RESERVED_EVENT | {"between", "exists", "trait", "score", "now"}
names = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True)
events = names.filter(lambda s: s not in _RESERVED_EVENT)
prop_names = names.filter(lambda s: s not in _RESERVED_PROP)
windows = st.one_of(st.none(), st.integers(1, MAX_TIME_MS - 1),
                    st.sampled_from(sorted(DURATION_MS.values())).map(lambda u: u * 3))
durations = st.integers(1, 10 ** 12)
ints = st.integers(-(10 ** 15), 10 ** 15)
floats = st.floats(allow_nan=False, allow_infinity=False)
nums = st.one_of(ints, floats).map(Num)
texts = st.text(max_size=12)
literals = st.one_of(ints, floats, texts)
cmp_ops = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
str_ops = st.sampled_from(["contains", "startswith", "matches"])


@st.composite
def str_tests(draw, subject):
    op = draw(str_ops)
    pattern = draw(texts)
    if op == "matches":
        pattern = draw(st.sampled_from([re.escape(pattern), "^a.*$", r"\d+", "(x|y)?z"]))
    return StrTest(op, draw(subject), pattern)


def checks_of(subject, strings=True):
    """Every test form on one property/trait/score compared with constants (a score, being a
    number, is never compared with a string constant: that is a RuleError)."""
    return st.one_of(
        st.builds(Compare, cmp_ops, subject,
                  st.one_of(nums, texts.map(Str)) if strings else nums),
        st.builds(lambda v, c, op: Compare(op, c, v), subject, nums, cmp_ops),
        st.builds(InList, subject, st.lists(literals, max_size=4).map(tuple), st.booleans()),
        st.builds(Between, subject, nums, nums),
        str_tests(subject),
        st.builds(Exists, subject),
    )


def logic(leaves, max_leaves=8):
    def extend(children):
        many = st.lists(children, min_size=2, max_size=4).map(tuple)
        return st.one_of(many.map(And), many.map(Or), children.map(Not))
    return st.recursive(leaves, extend, max_leaves=max_leaves)


where_conds = logic(checks_of(prop_names.map(Prop)), max_leaves=4)
aggs = st.one_of(
    st.builds(lambda e, w, win: Agg("count", e, None, w, win), events,
              st.one_of(st.none(), where_conds), windows),
    st.builds(Agg, st.sampled_from(["sum", "avg", "min", "max", "distinct"]), events, names,
              st.one_of(st.none(), where_conds), windows),
)
numeric = st.one_of(aggs, names.map(Score))
numeric_values = st.one_of(
    numeric,
    st.builds(Arith, st.sampled_from("+-"), numeric, st.one_of(nums, numeric)),
    st.builds(Arith, st.sampled_from("+-"), nums, numeric),
    st.builds(lambda a, op, x, y: Arith("-", a, Arith(op, x, y)), numeric, st.sampled_from("+-"),
              nums, nums),
)
time_terms = st.one_of(st.just(FirstSeen()), st.just(LastSeen()), events.map(First),
                       events.map(Last))
time_tests = st.one_of(
    # first_seen >= now - 7d
    st.builds(lambda t, op, d: Compare(op, t, Arith("-", Now(), Dur(d))), time_terms, cmp_ops,
              durations),
    # now - last(E) > 30d
    st.builds(lambda t, op, d: Compare(op, Arith("-", Now(), t), Dur(d)), time_terms, cmp_ops,
              durations),
    # now + -7d < last_seen
    st.builds(lambda t, op, d: Compare(op, Arith("+", Now(), Dur(-d)), t), time_terms, cmp_ops,
              durations),
)
rule_leaves = st.one_of(
    st.builds(Compare, cmp_ops, numeric_values, nums),
    st.builds(Compare, cmp_ops, nums, numeric_values),
    st.builds(Compare, cmp_ops, numeric, numeric),
    checks_of(names.map(Trait)),
    checks_of(names.map(Score), strings=False),
    time_tests,
    st.builds(lambda e, w, win: did(e, w, win), events, st.one_of(st.none(), where_conds),
              windows),
    st.just(Seen()),
    names.map(InSegment),
    st.tuples(st.integers(0, 9999), st.integers(0, 9999)).map(lambda p: Bucket(*sorted(p))),
    st.integers(1, MAX_TIME_MS - 1).map(Inactive),
    st.builds(Abandoned, events, events, st.integers(0, MAX_TIME_MS - 1),
              st.one_of(st.none(), names)),
)
rules_ = logic(rule_leaves)

HYPO = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYPO
@given(rules_)
def test_random_asts_round_trip_through_text_and_json(node):
    validate(node)   # the strategy is valid by construction
    text = to_text(node)
    assert parse(text) == node, text
    assert to_text(parse(text)) == text
    assert from_json(to_json(node)) == node
    assert from_json(msgspec.json.decode(to_json(node))) == node


def _value(v) -> b.Value:
    if isinstance(v, Num):
        return b.lit(v.value)
    if isinstance(v, Str):
        return b.lit(v.value)
    if isinstance(v, Dur):
        return b.dur(v.ms) if v.ms >= 0 else -b.dur(-v.ms)
    if isinstance(v, Now):
        return b.now
    if isinstance(v, FirstSeen):
        return b.first_seen
    if isinstance(v, LastSeen):
        return b.last_seen
    if isinstance(v, First):
        return b.first(v.event)
    if isinstance(v, Last):
        return b.last(v.event)
    if isinstance(v, Trait):
        return b.trait(v.name)
    if isinstance(v, Score):
        return b.score(v.name)
    if isinstance(v, Prop):
        return b.prop(v.name)
    if isinstance(v, Agg):
        where = None if v.where is None else _cond(v.where)
        if v.fn == "count":
            return b.count(v.event, v.window_ms, where=where)
        return getattr(b, v.fn)(v.event, v.prop, v.window_ms, where=where)
    if isinstance(v, Arith):
        return (operator.add if v.op == "+" else operator.sub)(_value(v.left), _value(v.right))
    raise AssertionError(v)


def _plain(v):
    """A constant as the plain Python value the builder coerces (a str stays a str)."""
    return v.value if isinstance(v, Num) else _value(v)


_CMP = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
        ">": operator.gt, ">=": operator.ge}


def _cond(c) -> b.Cond:
    """Rebuild an AST with the builder: `&`/`|` chains, closed with and_/or_ like parentheses."""
    if isinstance(c, And):
        return b.and_(functools.reduce(operator.and_, [_cond(i) for i in c.items]))
    if isinstance(c, Or):
        return b.or_(functools.reduce(operator.or_, [_cond(i) for i in c.items]))
    if isinstance(c, Not):
        return ~_cond(c.item)
    if isinstance(c, Compare):
        right = _plain(c.right) if isinstance(c.right, Num) else _value(c.right)
        return _CMP[c.op](_value(c.left), right)
    if isinstance(c, InList):
        v = _value(c.value)
        return v.not_in(list(c.items)) if c.negated else v.isin(list(c.items))
    if isinstance(c, Between):
        return _value(c.value).between(_plain(c.low), _plain(c.high))
    if isinstance(c, StrTest):
        return getattr(_value(c.value), c.op)(c.pattern)
    if isinstance(c, Exists):
        return _value(c.value).exists()
    if isinstance(c, Seen):
        return b.seen
    if isinstance(c, InSegment):
        return b.in_(c.name)
    if isinstance(c, Bucket):
        return b.bucket(c.lo, c.hi)
    if isinstance(c, Inactive):
        return b.inactive(c.window_ms)
    if isinstance(c, Abandoned):
        return b.abandoned(c.a, c.b, c.within_ms, by=c.by)
    raise AssertionError(c)


@HYPO
@given(rules_)
def test_random_asts_rebuilt_with_the_builder(node):
    built = _cond(node)
    assert built.node == node
    assert built.text == to_text(node)


@HYPO
@given(st.lists(rule_leaves, min_size=2, max_size=5))
def test_builder_chains_are_flat_like_the_parser(leaves):
    conds = [_cond(x) for x in leaves]
    assert functools.reduce(operator.and_, conds).node == \
        parse(" and ".join(f"({to_text(x)})" for x in leaves))
    assert functools.reduce(operator.or_, conds).node == \
        parse(" or ".join(f"({to_text(x)})" for x in leaves))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_any_text_parses_or_raises_rule_error(text):
    try:
        node = parse(text)
    except RuleError as e:
        assert e.line is not None and e.column is not None
        assert 1 <= e.line <= text.count("\n") + 1
    else:
        assert parse(to_text(node)) == node


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(
    list("()[],.+-<>=! \"\n") + ["count", "sum", "a.v", "a", "where", "and", "or", "not", "in",
                                 "1", "1d", "all", "trait.x", "seen", "now", "x", "between",
                                 "exists", "-", "\\"]), max_size=20).map("".join))
def test_token_soup_parses_or_raises_rule_error(text):
    try:
        node = parse(text)
    except RuleError as e:
        assert e.line is not None and e.column is not None
    else:
        assert parse(to_text(node)) == node
        assert from_json(to_json(node)) == node


# ---- names and number/string comparisons (review follow-ups)
def test_json_names_must_be_spellable():
    from segcore.rules import from_json
    bad = b'{"kind": "compare", "op": ">=", "left": {"kind": "agg", "fn": "count", ' \
          b'"event": "Order Completed"}, "right": {"kind": "num", "value": 1}}'
    with pytest.raises(RuleError, match="`Order Completed` is not a valid name") as e:
        from_json(bad)
    assert e.value.path == "$"


@pytest.mark.parametrize("text", ['count(a) > "3"', 'score.x == "high"',
                                  'first_seen between "a" and 5'])
def test_number_compared_with_string_is_rejected(text):
    with pytest.raises(RuleError, match="a number cannot be compared with a string"):
        parse(text)


def test_engine_checks_event_types_of_ast_rules():
    import segcore
    eng = segcore.Engine(event_types=["purchase"])
    with pytest.raises(RuleError, match="unknown event type `purchse`.*did you mean `purchase`"):
        eng.add_segment("fb", parse("count(purchse) >= 1"))
