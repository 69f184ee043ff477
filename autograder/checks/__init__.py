"""Checks shared by a notebook's test cells and the grader's clean re-check.

A test cell checks the student's answers, one line per answer::

    from autograder.checks import hw2_pipeline_bubbles as checks
    checks.check("T_total_16")                              # the variable named T_total_16
    checks.check("time_ratio_16", T_total_16 / T_ideal_16)  # a value
    checks.check("schedule_p4_m8", lambda: one_f_one_b(4, 8))   # computed here, safely

``check`` (made by :func:`make_checker`) records the answer in the file named by
``$PARALAB_ANSWERS`` (nothing happens when it is unset, e.g. on a student's laptop), checks
it right away and prints one line: ``✓ key: ...`` on stdout or ``✗ key: what is wrong`` on
stderr.  It never raises, so every check of a cell runs and reports, and a cell earns the
points of the checks that pass.  Given a function of no arguments, ``check`` calls it and
records an exception it raises as a failed answer (the message says where in the student's
code it came from), so one broken answer does not hide the checks after it.

The student's code runs in the same kernel and could replace any of this, so the grader
does not trust the kernel's verdict: it re-runs the same checks on the recorded answers in a
fresh process (``python -m autograder.verify``).  The kernel check runs on the answer as
decoded from its recorded form, so both verdicts agree unless something in the kernel was
tampered with.

An assignment's module ``autograder/checks/<assignment>.py`` defines

* ``CHECKS``: answer key -> function(decoded value) -> :class:`Verdict`;
* ``GRADE_CELLS``: nbgrader ``grade_id`` of each autograded test cell -> the keys that cell
  records: a list (the cell's points are split evenly over them) or a dict ``{key: weight}``
  (split in proportion to the weights).  A cell earns ``points * (weight passed) / (total
  weight)``;
* ``SYMBOLS`` (optional): names allowed in SymPy answers (strings or Symbols);
* ``PROBES`` (optional): answer keys that only a separate run of the student's code, with the
  library's reference implementations unavailable, may record (see :class:`Probe`);
* ``check = make_checker(CHECKS, symbols=SYMBOLS)``.

Keep this package light: it is imported inside the grading sandbox and by every test cell.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import traceback
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from . import expr  # noqa: F401 - imported now, before a course directory joins __path__
from .codec import DecodeError, Decoder, Raised, dumps_record, encode, read_records

ANSWERS_ENV = "PARALAB_ANSWERS"
CHECKS_PATH_ENV = "PARALAB_CHECKS_PATH"
PASS, FAIL = "\u2713", "\u2717"

__all__ = ["ANSWERS_ENV", "Verdict", "Probe", "Raised", "answer", "make_checker", "decode",
           "encode", "DecodeError", "read_records", "add_path", "run_check", "cell_weights",
           "handles_raised", "as_integer", "as_real",
           "equals", "close", "same_expression", "tensor_close", "same_schedule"]


def add_path(directory: str) -> None:
    """Look for assignment check modules in ``directory`` first (a course root other than
    this repository keeps them in ``<root>/autograder/checks``)."""
    directory = os.path.abspath(directory)
    if os.path.isdir(directory):
        if directory in __path__:
            __path__.remove(directory)
        __path__.insert(0, directory)


for _extra in filter(None, os.environ.get(CHECKS_PATH_ENV, "").split(os.pathsep)):
    add_path(_extra)


class Verdict(NamedTuple):
    """The result of one check: whether it passed and what to tell the student."""

    passed: bool
    message: str


@dataclass(frozen=True)
class Probe:
    """An answer that only a separate run of the student's code may record.

    Some answers must be computed without the course library's reference implementation
    (the library contains the answers to the coding exercises).  Whatever the student's
    kernel records for such a key is ignored.  Instead the grader runs, in a fresh sandbox,
    the submitted cells ``cells`` (grade_ids, in order) followed by
    ``checks.check(key, lambda: <call>)``, with every function named in ``unavailable``
    (``"module:qualname"``) replaced by one that raises ``ReferenceUnavailable``.  A student
    who delegates to the library then gets that exception as their answer."""

    cells: tuple[str, ...]
    call: str
    unavailable: tuple[str, ...]


def answer(key: str, value: Any) -> None:
    """Record ``value`` as the answer ``key`` for the clean re-check (no-op when
    ``$PARALAB_ANSWERS`` is unset)."""
    path = os.environ.get(ANSWERS_ENV)
    if not path:
        return
    line = dumps_record(key, value)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def decode(encoded: Any, symbols: Iterable[Any] = (), functions: Any = None) -> Any:
    """Rebuild a value from its recorded form (raises :class:`DecodeError`)."""
    return Decoder(symbols, functions).decode(encoded)


def handles_raised(check: Callable) -> Callable:
    """Mark a check that wants to see a :class:`Raised` answer (an exception the student's
    code raised) instead of the generic "raised ..." verdict."""
    check.handles_raised = True  # type: ignore[attr-defined]
    return check


def originality(check: Callable[[Any], Verdict], delegated: str) -> Callable[[Any], Verdict]:
    """The verdict on an originality probe's answer (the student's function run again where
    the library's reference raises ``ReferenceUnavailable``): ``delegated`` says what to
    do instead when the answer called the reference; otherwise ``check`` judges the answer
    the student's own code gave."""
    @handles_raised
    def verdict(value: Any) -> Verdict:
        if isinstance(value, Raised):
            if value.type == "ReferenceUnavailable":
                return Verdict(False, f"{delegated} ({value.message})")
            return Verdict(False, value.describe())
        judged = check(value)
        return Verdict(judged.passed, "your own implementation" if judged.passed
                       else judged.message)
    return verdict


def run_check(checks: Mapping[str, Callable], key: str, encoded: Any,
              symbols: Iterable[Any] = (), functions: Any = None) -> Verdict:
    """Decode ``encoded`` and apply ``checks[key]``; never raises: whatever goes wrong with
    one answer fails that answer's check only."""
    if key not in checks:
        return Verdict(False, f"no check with this name (course error: add {key!r} to CHECKS)")
    try:
        value = decode(encoded, symbols, functions)
    except DecodeError as e:
        return Verdict(False, str(e))
    except Exception as e:  # noqa: BLE001 - a crafted record must fail its check, not crash
        return Verdict(False, f"the recorded answer could not be read ({type(e).__name__})")
    check = checks[key]
    if isinstance(value, Raised) and not getattr(check, "handles_raised", False):
        return Verdict(False, value.describe())
    try:
        verdict = check(value)
    except Exception as e:  # noqa: BLE001 - an unexpected value must fail, not crash
        return Verdict(False, f"the answer could not be checked "
                              f"({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(verdict, tuple) or len(verdict) != 2:
        return Verdict(False, f"the check returned {type(verdict).__name__}, not a Verdict "
                              f"(course error)")
    return Verdict(bool(verdict[0]), str(verdict[1]))


def cell_weights(keys: Any) -> dict[str, float]:
    """``{key: weight}`` of one ``GRADE_CELLS`` entry (a list means equal weights)."""
    if isinstance(keys, Mapping):
        return {str(k): float(w) for k, w in keys.items()}
    return {str(k): 1.0 for k in keys}


_MISSING = object()


def _student_frame(tb: Any) -> str:
    """Where in the student's code an exception came from: the innermost frame that is
    not in this package or the library."""
    here = os.path.dirname(os.path.abspath(__file__))
    frames = [f for f in traceback.extract_tb(tb)
              if not os.path.abspath(f.filename).startswith(here)]
    for frame in reversed(frames):
        name = frame.filename
        if "site-packages" in name or os.sep + "paralab" + os.sep in name:
            continue
        line = (frame.line or "").strip()
        where = f"in {frame.name}" if frame.name != "<module>" else "in the cell"
        return f" ({where}, line {frame.lineno}: {line[:80]})" if line else f" ({where})"
    return ""


def _is_thunk(value: Any) -> bool:
    """A function of no arguments written in the test cell (``lambda: f(4, 8)``); answers
    themselves are never Python functions (a function cannot be recorded)."""
    import types
    return isinstance(value, types.FunctionType) and value.__code__.co_argcount == 0


def _obtain(key: str, value: Any, caller_globals: dict) -> Any:
    if value is _MISSING:
        if key in caller_globals:
            return caller_globals[key]
        import builtins
        if hasattr(builtins, key):
            return getattr(builtins, key)
        return Raised(Raised.NOT_DEFINED, f"{key} is not defined: write your answer in the "
                                          f"cell above and run it (if it raised an error, "
                                          f"fix that first)")
    if _is_thunk(value):
        try:
            return value()
        except KeyboardInterrupt:
            raise  # the cell's time limit: stop the cell
        except Exception as e:  # noqa: BLE001 - the student's code failed: that is the answer
            return Raised(type(e).__name__, str(e)[:300] + _student_frame(e.__traceback__))
    return value


def make_checker(checks: dict[str, Callable[[Any], Verdict]], *, symbols: Iterable[Any] = (),
                 functions: Any = None) -> Callable[..., None]:
    """``check(key[, value])`` for test cells: record, check, print one line.

    Without ``value`` the answer is the variable named ``key`` of the calling cell; a
    function of no arguments is called and what it raises becomes the (failed) answer."""
    symbols = tuple(symbols)

    def check(key: str, value: Any = _MISSING) -> None:
        caller = sys._getframe(1).f_globals if value is _MISSING else {}
        value = _obtain(key, value, caller)
        answer(key, value)
        verdict = run_check(checks, key, encode(value), symbols, functions)
        if verdict.passed:
            print(f"{PASS} {key}: {verdict.message}", flush=True)
        else:
            sys.stdout.flush()
            print(f"{FAIL} {key}: {verdict.message}", file=sys.stderr, flush=True)

    check.checks = checks  # type: ignore[attr-defined]
    return check


# ---------------------------------------------------------------------------------------
# Numbers as students write them: 57, 57.0, sympy.Integer(57), numpy.int64(57)...


def as_real(value: Any) -> float | None:
    """``value`` as a float if it is a real number of any common kind, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, Fraction)):
        return float(value)
    if isinstance(value, numbers.Real):  # numpy scalars
        return float(value)
    try:
        import sympy
    except ImportError:  # pragma: no cover
        return None
    if isinstance(value, sympy.Basic) and value.is_number and value.is_real:
        return float(value)
    return None


def as_integer(value: Any) -> int | None:
    """``value`` as an int if it is a whole number of any common kind (``57``, ``57.0``,
    ``Fraction(57)``, SymPy or numpy integers), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    x = as_real(value)
    if x is None or not math.isfinite(x) or x != int(x):
        return None
    if isinstance(value, Fraction) and value.denominator != 1:
        return None
    return int(x)


# ---------------------------------------------------------------------------------------
# Ready-made checks.  Each returns a function(value) -> Verdict.  ``hint`` replaces the
# default failure message (use it to name the misconception); ``reveal=False`` keeps the
# expected value out of the message (for hidden tests).


def _fail(hint: str | None, default: str) -> Verdict:
    return Verdict(False, hint or default)


def equals(expected: Any, hint: str | None = None, reveal: bool = True):
    """Exact equality (``1 == 1.0``; lists and tuples compared item by item)."""
    def check(value: Any) -> Verdict:
        if _plain(value) == _plain(expected):
            return Verdict(True, "correct")
        shown = f"expected {expected!r}, got {value!r}" if reveal else \
            f"got {_short(value)}, which is not the expected answer"
        return _fail(hint, shown)
    return check


def close(expected: float, rel: float = 1e-9, abs_tol: float = 0.0, hint: str | None = None,
          reveal: bool = True):
    """A number within ``rel`` (relative) or ``abs_tol`` of ``expected``."""
    def check(value: Any) -> Verdict:
        x = as_real(value)
        if x is None:
            return _fail(hint, f"expected a number, got {type(value).__name__}")
        if math.isclose(x, float(expected), rel_tol=rel, abs_tol=abs_tol):
            return Verdict(True, "correct")
        shown = f"expected {expected!r}, got {value!r}" if reveal else \
            f"{value!r} is not the expected value"
        return _fail(hint, shown)
    return check


def match_formula(value: Any, expected: Any, misconceptions: Iterable[tuple[Any, str]] = (),
                  symbols: Mapping[str, Any] | None = None) -> tuple[Verdict | None, Any]:
    """What every homework's formula checks share: ``(verdict, value)`` where the verdict is
    settled when ``value`` is no SymPy expression, equals ``expected`` or a known wrong
    formula of ``misconceptions``, and ``None`` otherwise (the homework then explains how
    the answer differs).  Floats are read as exact rationals, and a symbol is replaced by
    ``symbols``' one of the same name (a kernel may build it with other assumptions)."""
    import sympy

    if not isinstance(value, sympy.Basic):
        return Verdict(False, f"expected a SymPy expression, got {type(value).__name__}"), value
    value = sympy.nsimplify(value, rational=True) if value.has(sympy.Float) else value
    if symbols:
        value = value.subs({x: symbols[x.name] for x in value.free_symbols
                            if x.name in symbols})
    if sympy.simplify(value - expected) == 0:
        return Verdict(True, "correct"), value
    for wrong, message in misconceptions:
        if sympy.simplify(value - wrong) == 0:
            return Verdict(False, message), value
    return None, value


def formula_check(expected: Any, misconceptions: Iterable[tuple[Any, str]] = (),
                  symbols: Mapping[str, Any] | None = None,
                  evaluate: Callable[[Any], Any] | None = None, where: str = "",
                  right: str = "equivalent to the right formula") -> Callable[[Any], Verdict]:
    """The check of a formula answer, as every homework explains one: a number is refused
    (or named, when it is a known wrong value), an equivalent formula passes, a known wrong
    formula gets its message (:func:`match_formula`), a formula in symbols the answer does
    not have says which, and any other shows what it gives at the homework's numbers:
    ``evaluate(formula)`` is that number and ``where`` says which numbers in words ("at the
    homework's p=4, m=8")."""
    import sympy

    misconceptions = list(misconceptions)
    names = ", ".join(sorted(str(x) for x in expected.free_symbols))

    def check(value: Any) -> Verdict:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = sympy.nsimplify(value, rational=True)
            for wrong, message in misconceptions:
                if sympy.simplify(number - wrong) == 0:
                    return Verdict(False, message)
            return Verdict(False, f"expected a formula in {names}, got a number: use the "
                                  f"symbols defined at the top of the notebook")
        verdict, value = match_formula(value, expected, misconceptions, symbols)
        if verdict is not None:
            return verdict
        extra = value.free_symbols - expected.free_symbols
        if extra:
            return Verdict(False, f"{value} depends on {', '.join(sorted(map(str, extra)))}; "
                                  f"the answer depends only on {names}")
        if evaluate is not None:
            try:
                got, want = evaluate(value), evaluate(expected)
            except Exception:  # noqa: BLE001 - a value that does not evaluate is just wrong
                got = want = None
            if got is not None and getattr(got, "is_number", False) and want.is_number \
                    and got != want:
                return Verdict(False, f"{value} is not {right}: {where} it gives {got}, "
                                      f"the right one {want}")
        return Verdict(False, f"{value} is not {right}")
    return check


def each_size(diagnose: Callable[[Any, int, int], Verdict],
              sizes: Iterable[tuple[int, int]]) -> Callable[[Any], Verdict]:
    """A hidden test over schedules: one answer per ``(p, m)`` of ``sizes``, each diagnosed
    by ``diagnose(schedule, p, m)``; the first that fails says which size it was."""
    sizes = list(sizes)

    def check(value: Any) -> Verdict:
        if not isinstance(value, list) or len(value) != len(sizes):
            return Verdict(False, "expected one schedule per hidden size")
        for schedule, (p_value, m_value) in zip(value, sizes):
            verdict = diagnose(schedule, p_value, m_value)
            if not verdict.passed:
                return Verdict(False, f"p={p_value}, m={m_value}: {verdict.message}")
        return Verdict(True, f"correct on all {len(sizes)} hidden sizes")
    return check


def same_expression(expected: Any, hint: str | None = None, reveal: bool = True):
    """A SymPy expression equivalent to ``expected``: ``simplify(value - expected) == 0``.
    Floats in the answer are read as exact rationals (0.5 is 1/2)."""
    import sympy

    def check(value: Any) -> Verdict:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = sympy.nsimplify(value, rational=True)
        if not isinstance(value, sympy.Basic):
            return _fail(hint, f"expected a SymPy expression, got {type(value).__name__}")
        value = sympy.nsimplify(value, rational=True) if value.has(sympy.Float) else value
        extra = value.free_symbols - sympy.sympify(expected).free_symbols
        if sympy.simplify(value - expected) == 0:
            return Verdict(True, "correct")
        if extra:
            names = ", ".join(sorted(map(str, extra)))
            return _fail(hint, f"your expression depends on {names}, the expected one does not")
        shown = f"expected an expression equal to {expected}, got {value}" if reveal else \
            f"{value} is not equivalent to the expected expression"
        return _fail(hint, shown)
    return check


def tensor_close(expected: Any, rtol: float = 1e-5, atol: float = 1e-8, hint: str | None = None,
                 reveal: bool = True):
    """A tensor with ``expected``'s shape and values within tolerance (dtype may differ)."""
    def check(value: Any) -> Verdict:
        import torch
        if not isinstance(value, torch.Tensor):
            return _fail(hint, f"expected a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(expected.shape):
            return _fail(hint, f"expected shape {tuple(expected.shape)}, got "
                               f"{tuple(value.shape)}")
        if value.is_complex() != expected.is_complex():
            return _fail(hint, "complex and real tensors differ")
        a = value.to(torch.complex128 if value.is_complex() else torch.float64)
        b = expected.to(a.dtype)
        if torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=False):
            return Verdict(True, "correct")
        diff = (a - b).abs().max().item()
        shown = f"values differ from the expected tensor (largest difference {diff:.3g})"
        if reveal:
            shown += f"; expected {expected.tolist()}"[:400]
        return _fail(hint, shown)
    return check


def same_schedule(expected: Any, hint: str | None = None, reveal: bool = True):
    """A schedule whose per-rank action lists equal ``expected``'s."""
    def check(value: Any) -> Verdict:
        if not hasattr(value, "to_strings"):
            return _fail(hint, f"expected a schedule, got {type(value).__name__}")
        got, want = value.to_strings(), expected.to_strings()
        if got == want:
            return Verdict(True, "correct")
        if len(got) != len(want):
            return _fail(hint, f"expected {len(want)} ranks, got {len(got)}")
        for r, (g, w) in enumerate(zip(got, want)):
            if g != w:
                step = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b),
                            min(len(g), len(w)))
                detail = f"rank {r} differs first at step {step}"
                if reveal and step < len(w):
                    seen = g[step] if step < len(g) else "nothing"
                    detail += f": expected {w[step]}, got {seen}"
                return _fail(hint, detail)
        return _fail(hint, "the schedules differ")
    return check


def _plain(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."
