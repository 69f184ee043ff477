"""Answers as JSON: encoded in the student's kernel, decoded safely in the clean process.

The clean verdict must not depend on anything the student's kernel could have replaced, so
an answer crosses the process boundary as plain data:

========================  ==================================================================
Python value              JSON form
========================  ==================================================================
None, bool, int, str      itself
float                     itself (NaN and infinities as JSON's ``NaN``, ``Infinity``)
list                      a JSON array of encoded items
tuple (and namedtuple)    ``{"tuple": [...]}``
dict                      ``{"dict": [[key, value], ...]}`` (keys of any encodable type)
set, frozenset            ``{"set": [...]}``
Fraction                  ``{"fraction": "a/b"}``
SymPy expression          ``{"sympy": str(expr)}``
torch tensor              ``{"tensor": nested list, "dtype": "float32", "shape": [...]}``
numpy array / scalar      ``{"ndarray": nested list, "dtype": ..., "shape": [...]}`` / number
paralab Schedule          ``{"schedule": [[action, ...], ...], "num_microbatches": m,
                          "num_stages": s, "name": ...}`` (anything with ``to_strings()``)
:class:`Raised`           ``{"raised": {"type": "NameError", "message": "..."}}``: the
                          student's code raised instead of producing an answer
anything else             ``{"unencodable": "TypeName"}`` (the check then fails clearly)
========================  ==================================================================

Decoding runs on untrusted data, so it uses ``json`` only, caps every size, and reads SymPy
text with :mod:`autograder.checks.expr` (a whitelist parser, never ``eval``).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any, Iterable

MAX_DEPTH = 32            # nesting of containers
MAX_ITEMS = 1_000_000     # scalars in one answer (tensor elements included)
MAX_LINE = 8 * 2**20      # bytes of one encoded answer
MAX_TEXT = 100_000        # characters of one string / expression / fraction

_TENSOR_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
                  "int8", "uint8", "bool", "complex64", "complex128")


class EncodeError(ValueError):
    pass


class Raised:
    """The answer is an exception: the student's code raised ``type`` with ``message``
    while computing it.  It is recorded like an answer, so that the clean re-check sees
    the failure too, and it fails its check with :meth:`describe`."""

    __slots__ = ("type", "message")

    def __init__(self, type: str, message: str):
        self.type, self.message = str(type)[:100], str(message)[:MAX_TEXT]

    # the type of a Raised made when the answer's variable does not exist (no exception)
    NOT_DEFINED = "NotDefined"

    def describe(self) -> str:
        if self.type == self.NOT_DEFINED:
            return self.message
        message = self.message.strip()
        if message.startswith("("):  # only where it came from
            return f"your code raised {self.type} {message}"
        return f"your code raised {self.type}" + (f": {message}" if message else "")

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Raised) and (self.type, self.message) == (other.type,
                                                                           other.message)

    def __hash__(self) -> int:
        return hash((self.type, self.message))

    def __repr__(self) -> str:
        return f"Raised({self.type!r}, {self.message!r})"


class DecodeError(ValueError):
    """An answer that cannot be read back; the message says why, for the feedback."""


# ---------------------------------------------------------------------------------------
# Encoding (runs in the student's kernel)


def encode(value: Any) -> Any:
    """The JSON-able form of ``value`` (see the module docstring)."""
    budget = [MAX_ITEMS]
    try:
        return _encode(value, 0, budget)
    except EncodeError as e:
        return {"unencodable": str(e)}
    except RecursionError:
        return {"unencodable": "nested too deeply"}


def _spend(budget: list, n: int) -> None:
    budget[0] -= n
    if budget[0] < 0:
        raise EncodeError(f"too large (more than {MAX_ITEMS} values)")


def _encode(value: Any, depth: int, budget: list) -> Any:
    if depth > MAX_DEPTH:
        raise EncodeError(f"nested more than {MAX_DEPTH} levels deep")
    _spend(budget, 1)
    if value is None or isinstance(value, bool):
        return bool(value) if value is not None else None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Fraction):
        return {"fraction": f"{value.numerator}/{value.denominator}"}
    if isinstance(value, Raised):
        return {"raised": {"type": value.type, "message": value.message}}
    module = type(value).__module__ or ""
    if module.startswith("torch") and hasattr(value, "detach") and hasattr(value, "tolist"):
        return _encode_tensor(value, budget)
    if module.startswith("numpy"):
        return _encode_numpy(value, budget)
    if module.startswith("sympy"):
        return {"sympy": str(value)}
    if callable(getattr(value, "to_strings", None)) and hasattr(value, "num_microbatches") \
            and hasattr(value, "num_stages"):
        rows = [[str(a) for a in row] for row in value.to_strings()]
        _spend(budget, sum(len(r) for r in rows))
        return {"schedule": rows, "num_microbatches": int(value.num_microbatches),
                "num_stages": int(value.num_stages), "name": str(getattr(value, "name", ""))}
    if isinstance(value, list):
        return [_encode(v, depth + 1, budget) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, depth + 1, budget) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, depth + 1, budget), _encode(v, depth + 1, budget)]
                         for k, v in value.items()]}
    if isinstance(value, (set, frozenset)):
        items = [_encode(v, depth + 1, budget) for v in value]
        return {"set": sorted(items, key=lambda x: json.dumps(x, sort_keys=True))}
    raise EncodeError(type(value).__name__)


def _encode_tensor(t: Any, budget: list) -> dict:
    if getattr(t, "is_sparse", False):
        t = t.to_dense()
    t = t.detach().cpu()
    _spend(budget, int(t.numel()))
    dtype = str(t.dtype).replace("torch.", "")
    if dtype not in _TENSOR_DTYPES:
        raise EncodeError(f"tensor of dtype {dtype}")
    data = t.tolist()
    if dtype.startswith("complex"):
        data = _complex_to_pairs(data)
    return {"tensor": data, "dtype": dtype, "shape": list(t.shape)}


def _encode_numpy(a: Any, budget: list) -> Any:
    if hasattr(a, "shape") and hasattr(a, "tolist") and getattr(a, "ndim", 0) > 0:
        _spend(budget, int(a.size))
        data = a.tolist()
        if str(a.dtype).startswith("complex"):
            data = _complex_to_pairs(data)
        return {"ndarray": data, "dtype": str(a.dtype), "shape": list(a.shape)}
    if hasattr(a, "item"):  # numpy scalar
        item = a.item()
        if isinstance(item, complex):
            raise EncodeError("complex scalar")
        return _encode(item, 0, budget)
    raise EncodeError(type(a).__name__)


def _complex_to_pairs(data: Any) -> Any:
    if isinstance(data, list):
        return [_complex_to_pairs(x) for x in data]
    return [data.real, data.imag]


def dumps_record(key: str, value: Any) -> str:
    """One line of the answers file."""
    line = json.dumps({"key": str(key), "value": encode(value)}, separators=(",", ":"))
    if len(line) > MAX_LINE:
        line = json.dumps({"key": str(key), "value": {"unencodable": "answer too large"}})
    return line


# ---------------------------------------------------------------------------------------
# Decoding (runs in the clean process on untrusted data)


def read_records(lines: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Last raw (still encoded) value per key, and a list of problems with the file."""
    records: dict[str, Any] = {}
    problems = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if len(line) > MAX_LINE:
            problems.append(f"line {number}: too long")
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            problems.append(f"line {number}: not JSON ({type(e).__name__})")
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get("key"), str) and "value" in obj):
            problems.append(f"line {number}: not an answer record")
            continue
        records[obj["key"]] = obj["value"]
    return records, problems


class Decoder:
    """Turns encoded answers back into Python values, within fixed limits."""

    def __init__(self, symbols: Iterable[Any] = (), functions: dict | None = None):
        self.symbols = symbols
        self.functions = functions

    def decode(self, obj: Any) -> Any:
        budget = [MAX_ITEMS]
        try:
            return self._decode(obj, 0, budget)
        except RecursionError:
            raise DecodeError("the answer is nested too deeply") from None

    def _decode(self, obj: Any, depth: int, budget: list) -> Any:
        if depth > MAX_DEPTH:
            raise DecodeError(f"the answer is nested more than {MAX_DEPTH} levels deep")
        budget[0] -= 1
        if budget[0] < 0:
            raise DecodeError("the answer is too large")
        if obj is None or isinstance(obj, (bool, int, float)):
            return obj
        if isinstance(obj, str):
            if len(obj) > MAX_TEXT:
                raise DecodeError("a string in the answer is too long")
            return obj
        if isinstance(obj, list):
            return [self._decode(v, depth + 1, budget) for v in obj]
        if not isinstance(obj, dict) or not obj:
            raise DecodeError("malformed answer record")
        tag = next(iter(obj))
        body = obj[tag]
        if tag == "tuple":
            return tuple(self._decode(v, depth + 1, budget) for v in _list(body))
        if tag == "set":
            items = [self._decode(v, depth + 1, budget) for v in _list(body)]
            try:
                return set(items)
            except TypeError:
                raise DecodeError("a set in the answer holds unhashable items") from None
        if tag == "dict":
            out = {}
            for pair in _list(body):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise DecodeError("malformed dict in the answer")
                key = self._decode(pair[0], depth + 1, budget)
                try:
                    out[key] = self._decode(pair[1], depth + 1, budget)
                except TypeError:
                    raise DecodeError("a dict key in the answer is unhashable") from None
            return out
        if tag == "fraction":
            if not isinstance(body, str) or len(body) > 200:
                raise DecodeError("malformed fraction in the answer")
            try:
                return Fraction(body)
            except (ValueError, ZeroDivisionError):
                raise DecodeError(f"cannot read the fraction {body[:40]!r}") from None
        if tag == "sympy":
            if not isinstance(body, str):
                raise DecodeError("malformed expression in the answer")
            from .expr import ExpressionError, parse_expression
            try:
                return parse_expression(body, self.symbols, self.functions)
            except ExpressionError as e:
                raise DecodeError(str(e)) from None
        if tag in ("tensor", "ndarray"):
            return self._decode_array(tag, obj, budget)
        if tag == "schedule":
            return self._decode_schedule(obj, budget)
        if tag == "raised":
            if not (isinstance(body, dict) and isinstance(body.get("type"), str)
                    and isinstance(body.get("message"), str)):
                raise DecodeError("malformed answer record")
            return Raised(body["type"], body["message"])
        if tag == "unencodable":
            raise DecodeError(f"the answer could not be recorded: {str(body)[:100]} values "
                              f"cannot be checked (convert it to a number, list, tensor, "
                              f"SymPy expression or schedule)")
        raise DecodeError(f"unknown answer type {tag[:40]!r}")

    def _decode_array(self, tag: str, obj: dict, budget: list) -> Any:
        dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get(tag)
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
                and len(shape) <= 16):
            raise DecodeError("malformed tensor shape in the answer")
        count = math.prod(shape)
        budget[0] -= count
        if budget[0] < 0:
            raise DecodeError("the tensor in the answer is too large")
        complex_ = isinstance(dtype, str) and dtype.startswith("complex")
        flat = _flatten_checked(data, shape, complex_)
        try:
            if tag == "tensor":
                import torch
                if dtype not in _TENSOR_DTYPES:
                    raise DecodeError(f"unsupported tensor dtype {str(dtype)[:20]!r}")
                torch_dtype = getattr(torch, dtype)
                values = [complex(a, b) for a, b in flat] if complex_ else flat
                return torch.tensor(values, dtype=torch_dtype).reshape(shape)
            import numpy
            try:
                np_dtype = numpy.dtype(str(dtype))
            except TypeError:
                raise DecodeError(f"unsupported array dtype {str(dtype)[:20]!r}") from None
            if np_dtype.kind not in "biufc":
                raise DecodeError(f"unsupported array dtype {str(dtype)[:20]!r}")
            values = [complex(a, b) for a, b in flat] if complex_ else flat
            return numpy.array(values, dtype=np_dtype).reshape(shape)
        except DecodeError:
            raise
        except (OverflowError, ValueError, TypeError, RuntimeError) as e:
            # e.g. an integer too large for the dtype: the record was not made by encode()
            raise DecodeError(f"the recorded array cannot be rebuilt ({type(e).__name__})"
                              ) from None

    def _decode_schedule(self, obj: dict, budget: list) -> Any:
        rows, m, s = obj.get("schedule"), obj.get("num_microbatches"), obj.get("num_stages")
        if not (isinstance(rows, list) and all(isinstance(r, list) for r in rows)
                and all(isinstance(a, str) and len(a) <= 40 for r in rows for a in r)):
            raise DecodeError("malformed schedule in the answer")
        if not (isinstance(m, int) and isinstance(s, int)):
            raise DecodeError("malformed schedule sizes in the answer")
        budget[0] -= sum(len(r) for r in rows)
        if budget[0] < 0:
            raise DecodeError("the schedule in the answer is too large")
        from paralab.schedules import Schedule, ScheduleError
        try:
            return Schedule.from_strings(rows, num_microbatches=m, num_stages=s,
                                         name=str(obj.get("name", "custom"))[:40])
        except (ScheduleError, ValueError, TypeError, ZeroDivisionError) as e:
            raise DecodeError(f"the recorded schedule is not valid: {e}") from None


def _list(body: Any) -> list:
    if not isinstance(body, list):
        raise DecodeError("malformed answer record")
    return body


def _flatten_checked(data: Any, shape: list, complex_: bool) -> list:
    """Flatten nested lists, checking that they have exactly ``shape``."""
    out: list = []

    def walk(x: Any, dim: int) -> None:
        if dim == len(shape):
            if complex_:
                if not (isinstance(x, list) and len(x) == 2 and all(_is_number(v) for v in x)):
                    raise DecodeError("malformed complex value in the answer")
            elif not _is_number(x):
                raise DecodeError("a tensor in the answer holds a non-number")
            out.append(x)
            return
        if not isinstance(x, list) or len(x) != shape[dim]:
            raise DecodeError("a tensor in the answer does not match its shape")
        for item in x:
            walk(item, dim + 1)

    walk(data, 0)
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float))  # bool is an int: bool tensors hold True/False
