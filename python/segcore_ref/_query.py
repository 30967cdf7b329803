"""``query()``: bitmap algebra over segment names.

Grammar (Python's precedence for these operators: ``~`` binds tightest, then ``-``, then ``&``,
then ``|``)::

    or   := and ("|" and)*
    and  := diff ("&" diff)*
    diff := unary ("-" unary)*
    unary:= "~" unary | NAME | "(" or ")"

``~x`` is the complement of ``x`` with respect to every user the engine knows.
"""

from __future__ import annotations

import difflib
import re

from pyroaring import BitMap

from segcore.errors import RuleError

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[&|~()\-]))")


def _error(reason: str, expr: str, pos: int) -> RuleError:
    return RuleError(f"{reason} in query `{expr}`", line=1, column=pos + 1)


def evaluate(expr: str, members, universe: BitMap, names) -> BitMap:
    """Evaluate ``expr``; ``members(name)`` gives a segment's bitmap, ``names`` the segments."""
    if not isinstance(expr, str):
        raise RuleError(f"a query must be a string, got {type(expr).__name__}")
    toks: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if m is None:
            p = pos + (len(expr[pos:]) - len(expr[pos:].lstrip()))
            raise _error(f"unexpected character `{expr[p]}`", expr, p)
        kind = m.lastgroup
        toks.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    toks.append(("eof", "", len(expr)))
    i = 0

    def peek():
        return toks[i]

    def take(op: str) -> bool:
        nonlocal i
        if toks[i][0] == "op" and toks[i][1] == op:
            i += 1
            return True
        return False

    def or_():
        r = and_()
        while take("|"):
            r = r | and_()
        return r

    def and_():
        r = diff()
        while take("&"):
            r = r & diff()
        return r

    def diff():
        r = unary()
        while take("-"):
            r = r - unary()
        return r

    def unary():
        nonlocal i
        if take("~"):
            return universe - unary()
        kind, text, p = peek()
        if take("("):
            r = or_()
            if not take(")"):
                k, t, q = peek()
                raise _error(f"expected `)`, found {'end of query' if k == 'eof' else '`'+t+'`'}",
                             expr, q)
            return r
        if kind == "name":
            i += 1
            if text not in names:
                close = difflib.get_close_matches(text, list(names), n=1, cutoff=0.6)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise _error(f"unknown segment `{text}`{hint}", expr, p)
            return BitMap(members(text))
        raise _error(f"expected a segment name, found "
                     f"{'end of query' if kind == 'eof' else '`' + text + '`'}", expr, p)

    result = or_()
    kind, text, p = peek()
    if kind != "eof":
        raise _error(f"unexpected `{text}`", expr, p)
    return result
