"""containerd's filter syntax, as accepted by ``List`` (``Walk``) on every containerd API.

containerd itself sends these to a proxy snapshotter: after a remote snapshot answers ``ALREADY_EXISTS``
its metadata layer looks the target up with ``labels."containerd.io/snapshot.ref"==<chain id>,parent=="<key>"``,
and ``ctr snapshot ls`` / CRI pass user filters through.  So the grammar and its corner cases follow
containerd's ``pkg/filters`` (this is an independent implementation of the same language)::

    filters   := filter*                 (a list; an object matches if ANY filter matches)
    filter    := selector ("," selector)* (ALL selectors must match)
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := Go string syntax in "..."; /.../ and |...| are also accepted after ~= (regular expressions)

A selector without operator tests presence.  ``!=`` is true when the field is absent.  ``~=`` is an unanchored
regular-expression search; a pattern that does not compile matches nothing (as in containerd, where the
error only reaches the log).  A syntax error raises :class:`~snapshotter.errors.InvalidArgument`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from snapshotter.errors import InvalidArgument

# An adaptor maps a field path to (value, present) for one object.
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]


class _Tok(Enum):
    EOF = "EOF"
    QUOTED = "Quoted"
    VALUE = "Value"
    FIELD = "Field"
    SEPARATOR = "Separator"
    OPERATOR = "Operator"
    ILLEGAL = "Illegal"
    OTHER = "Other"


_QUOTES = '"/|'
_OPERATOR_CHARS = "=!~"


def _is_field_char(c: str) -> bool:
    return c == "_" or ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9")


def _is_value_char(c: str) -> bool:
    if c == "," or c.isspace():
        return False
    cat = unicodedata.category(c)
    # Go's IsLetter/IsDigit/IsNumber/IsGraphic/IsPunct: anything printable (graphic includes symbols and marks)
    return not cat.startswith("C")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.value_mode = False
        self.err = ""

    def peek(self) -> str | None:
        """The next raw character (no whitespace skipping), None at the end."""
        return self.s[self.i] if self.i < len(self.s) else None

    def scan(self) -> tuple[int, _Tok, str]:
        s = self.s
        while self.i < len(s) and s[self.i].isspace():
            self.i += 1
        start = self.i
        if self.i >= len(s):
            return start, _Tok.EOF, ""
        c = s[self.i]
        if c == "\0":
            self.err = "unexpected null"
            self.i += 1
            return start, _Tok.ILLEGAL, c
        if c in _QUOTES:
            end = self._scan_quoted(c)
            if end < 0:
                return start, _Tok.ILLEGAL, s[start:]
            return start, _Tok.QUOTED, s[start:end]
        if c in ",.":
            self.i += 1
            self.value_mode = False
            return start, _Tok.SEPARATOR, c
        if c in _OPERATOR_CHARS:
            while self.i < len(s) and s[self.i] in _OPERATOR_CHARS:
                self.i += 1
            self.value_mode = True
            return start, _Tok.OPERATOR, s[start : self.i]
        if self.value_mode:
            while self.i < len(s) and _is_value_char(s[self.i]):
                self.i += 1
            self.value_mode = False
            if self.i == start:  # a control character: not part of any token
                self.i += 1
                return start, _Tok.OTHER, c
            return start, _Tok.VALUE, s[start : self.i]
        if _is_field_char(c):
            while self.i < len(s) and _is_field_char(s[self.i]):
                self.i += 1
            return start, _Tok.FIELD, s[start : self.i]
        self.i += 1
        return start, _Tok.OTHER, c

    def _scan_quoted(self, quote: str) -> int:
        """Advance past a quoted literal; return its end index, or -1 (and set ``err``) if malformed."""
        s = self.s
        j = self.i + 1
        while True:
            if j >= len(s) or s[j] == "\n":
                self.err = "quoted literal not terminated"
                self.i = len(s)
                return -1
            if s[j] == "\\":
                j += 2
                continue
            if s[j] == quote:
                self.i = j + 1
                return self.i
            j += 1


_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def _unquote(lit: str) -> str:
    """Go ``strconv.Unquote`` for "..." literals, extended (as containerd does) to /.../ and |...|."""
    if len(lit) < 2 or lit[0] != lit[-1] or lit[0] not in _QUOTES:
        raise ValueError("quote syntax error")
    quote, body = lit[0], lit[1:-1]
    if "\n" in body:
        raise ValueError("quote syntax error")
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == quote:
            raise ValueError("quote syntax error")
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError("quote syntax error")
        e = body[i + 1]
        i += 2
        if e in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[e].encode()
        elif e in "\"'|/":
            if e != quote:
                raise ValueError("quote syntax error")
            out += e.encode()
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i : i + n]
            if len(digits) < n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise ValueError("quote syntax error")
            v = int(digits, 16)
            i += n
            if e == "x":
                out.append(v)
            else:
                if v > 0x10FFFF or 0xD800 <= v <= 0xDFFF:
                    raise ValueError("quote syntax error")
                out += chr(v).encode()
        elif e in "01234567":
            digits = body[i - 1 : i + 2]
            if len(digits) < 3 or any(d not in "01234567" for d in digits):
                raise ValueError("quote syntax error")
            v = int(digits, 8)
            if v > 255:
                raise ValueError("quote syntax error")
            out.append(v)
            i += 2
        else:
            raise ValueError("quote syntax error")
    return out.decode("utf-8", errors="surrogateescape")


class _Op(Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    op: _Op
    value: str = ""
    regex: re.Pattern[str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.op is _Op.PRESENT:
            return present
        if self.op is _Op.EQUAL:
            return present and value == self.value
        if self.op is _Op.NOT_EQUAL:
            return value != self.value
        return self.regex is not None and self.regex.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """One filter string: all of its selectors must match."""

    selectors: tuple[Selector, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(s.match(adaptor) for s in self.selectors)


@dataclass(frozen=True)
class FilterSet:
    """Several filter strings: any may match.  Empty: everything matches."""

    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return not self.filters or any(f.match(adaptor) for f in self.filters)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.sc = _Scanner(text)

    def error(self, pos: int, msg: str) -> InvalidArgument:
        return InvalidArgument(f"filters: parse error: [{self.text} @{pos}]: {msg}")

    def parse(self) -> Filter:
        selectors = [self.selector()]
        while True:
            nxt = self.sc.peek()
            if nxt is None:
                break
            if nxt != ",":
                raise self.error(self.sc.i, f"unexpected input: {nxt}")
            self.sc.scan()
            selectors.append(self.selector())
        return Filter(tuple(selectors))

    def selector(self) -> Selector:
        path = self.fieldpath()
        if self.sc.peek() in (None, ","):
            return Selector(path, _Op.PRESENT)
        pos, tok, text = self.sc.scan()
        if tok is _Tok.ILLEGAL:
            raise self.error(pos, self.sc.err)
        if tok is not _Tok.OPERATOR:
            raise self.error(pos, 'expected an operator ("=="|"!="|"~=")')
        try:
            op = _Op(text)
        except ValueError:
            raise self.error(pos, f"unsupported operator {text!r}") from None
        pos, tok, text = self.sc.scan()
        if tok in (_Tok.VALUE, _Tok.FIELD):
            value = text
        elif tok is _Tok.QUOTED:
            value = self.unquote(pos, text, allow_alt=op is _Op.MATCHES)
        elif tok is _Tok.EOF:
            raise self.error(pos, "unexpected EOF")
        elif tok is _Tok.ILLEGAL:
            raise self.error(pos, self.sc.err)
        else:
            raise self.error(pos, "expected value or quoted")
        regex = None
        if op is _Op.MATCHES:
            try:
                regex = re.compile(value)
            except re.error:
                regex = None  # containerd: logged, never matches
        return Selector(path, op, value, regex)

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.sc.peek() == ".":
            self.sc.scan()
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        pos, tok, text = self.sc.scan()
        if tok is _Tok.FIELD:
            return text
        if tok is _Tok.QUOTED:
            return self.unquote(pos, text, allow_alt=False)
        if tok is _Tok.ILLEGAL:
            raise self.error(pos, self.sc.err)
        raise self.error(pos, "expected field or quoted")

    def unquote(self, pos: int, lit: str, allow_alt: bool) -> str:
        if not allow_alt and lit[0] != '"':
            raise self.error(pos, "invalid quote encountered")
        try:
            return _unquote(lit)
        except ValueError as e:
            raise self.error(pos, f"unquoting failed: {e}") from None


def parse(text: str) -> Filter:
    """Parse one filter string ("" matches everything)."""
    if text == "":
        return Filter(())
    return _Parser(text).parse()


def parse_all(texts: Sequence[str]) -> FilterSet:
    """Parse a request's filter list: an object matches if any of them matches."""
    return FilterSet(tuple(parse(t) for t in texts))


def info_getter(name: str, parent: str, kind: str, labels: dict[str, str]) -> Adaptor:
    """The adaptor for a snapshot's Info, with the field paths containerd's snapshot stores expose:
    ``name``, ``parent`` (always present, "" for none), ``kind`` (``active``/``view``/``committed``) and
    ``labels.<key>`` (the key may itself contain dots: the rest of the path is joined back)."""

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "kind":
            return kind, True
        if head == "labels":
            if not labels:
                return "", False
            key = ".".join(path[1:])
            return (labels[key], True) if key in labels else ("", False)
        return "", False

    return field


def matcher(texts: Sequence[str]) -> Callable[[Adaptor], bool]:
    """Parse ``texts`` now (so syntax errors surface before any work) and return the match function."""
    return parse_all(list(texts)).match
