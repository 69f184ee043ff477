"""Read a SymPy expression from text without ``eval``.

``sympy.sympify`` evaluates Python code, which is not acceptable on text coming out of a
student's kernel.  This module tokenises the text against a whitelist (numbers, ``+ - * /
**``, parentheses, commas, and the names an assignment allows), parses it by recursive
descent, and builds the expression from SymPy constructors.  Sizes are capped so that a
crafted expression such as ``9**9**9**9`` is refused instead of computed.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

MAX_LENGTH = 4000     # characters
MAX_TOKENS = 1000
MAX_DEPTH = 60        # parenthesis / operator nesting
MAX_DIGITS = 40       # digits in one number literal
MAX_RESULT_DIGITS = 400  # digits of a number computed from a power of two numbers

_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
                    r"|(?P<name>[A-Za-z_][A-Za-z_0-9]*)|(?P<op>\*\*|[-+*/(),]))")

DEFAULT_FUNCTIONS = ("sqrt", "Max", "Min", "ceiling", "floor", "log", "exp", "Abs")
CONSTANTS = ("pi", "E")


class ExpressionError(ValueError):
    """Text that is not an expression over the allowed names; the message says why."""


def parse_expression(text: str, symbols: Iterable[Any] = (), functions: Any = None) -> Any:
    """Parse ``text`` (as printed by ``str(expr)``) into a SymPy expression.

    ``symbols``: allowed symbol names, or SymPy ``Symbol`` objects (then the result uses
    exactly those objects, assumptions included).  ``functions``: allowed function names
    (a subset of :data:`DEFAULT_FUNCTIONS`, the default) or a ``{name: callable}`` dict.
    """
    import sympy

    if not isinstance(text, str):
        raise ExpressionError("the expression must be text")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"the expression is longer than {MAX_LENGTH} characters")
    table: dict[str, Any] = {}
    for s in symbols:
        if isinstance(s, str):
            table[s] = sympy.Symbol(s)
        else:
            table[str(s)] = s
    if functions is None:
        functions = DEFAULT_FUNCTIONS
    if isinstance(functions, dict):
        funcs = dict(functions)
    else:
        funcs = {name: getattr(sympy, name) for name in functions}
    consts = {"pi": sympy.pi, "E": sympy.E}
    tokens = _tokenize(text)
    parser = _Parser(tokens, table, funcs, consts, sorted(table))
    result = parser.expression(0)
    if parser.pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[parser.pos][1]!r} in the expression")
    return result


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            bad = text[pos:].lstrip()[:1]
            raise ExpressionError(f"the expression contains {bad!r}, which is not allowed "
                                  f"(only numbers, names, + - * / ** and parentheses)")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
        if len(tokens) > MAX_TOKENS:
            raise ExpressionError("the expression is too long")
    return tokens


class _Parser:
    def __init__(self, tokens, symbols, functions, constants, allowed):
        self.tokens = tokens
        self.pos = 0
        self.symbols = symbols
        self.functions = functions
        self.constants = constants
        self.allowed = allowed

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise ExpressionError("the expression ends too early")
        if value is not None and tok[1] != value:
            raise ExpressionError(f"expected {value!r} but found {tok[1]!r}")
        self.pos += 1
        return tok

    def _depth(self, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise ExpressionError("the expression is nested too deeply")
        return depth + 1

    # expression := term (('+' | '-') term)*
    def expression(self, depth: int) -> Any:
        depth = self._depth(depth)
        left = self.term(depth)
        while (tok := self.peek()) is not None and tok[1] in "+-" and tok[0] == "op":
            self.take()
            right = self.term(depth)
            left = left + right if tok[1] == "+" else left - right
        return left

    # term := unary (('*' | '/') unary)*
    def term(self, depth: int) -> Any:
        left = self.unary(depth)
        while (tok := self.peek()) is not None and tok[0] == "op" and tok[1] in ("*", "/"):
            self.take()
            right = self.unary(depth)
            if tok[1] == "*":
                left = left * right
            else:
                if right == 0:
                    raise ExpressionError("the expression divides by zero")
                left = left / right
        return left

    # unary := ('+' | '-') unary | power
    def unary(self, depth: int) -> Any:
        depth = self._depth(depth)
        tok = self.peek()
        if tok is not None and tok[0] == "op" and tok[1] in "+-":
            self.take()
            value = self.unary(depth)
            return -value if tok[1] == "-" else value
        return self.power(depth)

    # power := atom ('**' unary)?      (right-associative, like Python)
    def power(self, depth: int) -> Any:
        base = self.atom(depth)
        tok = self.peek()
        if tok is not None and tok == ("op", "**"):
            self.take()
            exponent = self.unary(depth)
            return _safe_pow(base, exponent)
        return base

    # atom := number | name | name '(' args ')' | '(' expression ')'
    def atom(self, depth: int) -> Any:
        import sympy

        kind, value = self.take()
        if kind == "num":
            digits = sum(c.isdigit() for c in value)
            if digits > MAX_DIGITS:
                raise ExpressionError(f"a number in the expression has more than {MAX_DIGITS} "
                                      f"digits")
            if any(c in value for c in ".eE"):
                return sympy.Float(value)
            return sympy.Integer(value)
        if kind == "name":
            nxt = self.peek()
            if nxt == ("op", "("):
                if value not in self.functions:
                    raise ExpressionError(f"the function {value!r} is not allowed here "
                                          f"(allowed: {', '.join(sorted(self.functions)) or 'none'})")
                self.take("(")
                args = [self.expression(depth)]
                while self.peek() == ("op", ","):
                    self.take(",")
                    args.append(self.expression(depth))
                self.take(")")
                try:
                    return self.functions[value](*args)
                except (TypeError, ValueError) as e:
                    raise ExpressionError(f"cannot apply {value} to these arguments: {e}") \
                        from None
            if value in self.symbols:
                return self.symbols[value]
            if value in self.constants:
                return self.constants[value]
            allowed = ", ".join(self.allowed) or "none"
            raise ExpressionError(f"the name {value!r} is not allowed in this answer "
                                  f"(allowed symbols: {allowed})")
        if value == "(":
            inner = self.expression(depth)
            self.take(")")
            return inner
        raise ExpressionError(f"unexpected {value!r} in the expression")


def _safe_pow(base: Any, exponent: Any) -> Any:
    """``base ** exponent``, refusing powers of numbers whose result would be huge."""
    if exponent.is_Number:
        if exponent.is_Integer or exponent.is_Rational:
            if abs(exponent) > 10**4:
                raise ExpressionError("an exponent in the expression is too large")
        elif abs(float(exponent)) > 10**4:
            raise ExpressionError("an exponent in the expression is too large")
        if base.is_Number and base != 0 and abs(exponent) > 1:
            size = _digits(base) * abs(float(exponent))
            if size > MAX_RESULT_DIGITS:
                raise ExpressionError("a power in the expression is too large to evaluate")
    return base ** exponent


def _digits(n: Any) -> float:
    """Roughly how many decimal digits the number ``n`` has (before or after the point)."""
    if n.is_Integer:
        return len(str(abs(int(n))))
    if n.is_Rational:
        return max(len(str(abs(int(n.p)))), len(str(abs(int(n.q)))))
    try:
        x = abs(float(n))
    except (OverflowError, TypeError, ValueError):
        return math.inf
    if x == 0 or math.isnan(x):
        return 1
    return abs(math.log10(x)) + 1 if math.isfinite(x) else math.inf
