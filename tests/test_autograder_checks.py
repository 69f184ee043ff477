"""Answer recording, safe decoding and the clean verdict (autograder.checks, .verify)."""

import json
import linecache
import math
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import sympy as sp
import torch

from autograder.checks import (DecodeError, Probe, Raised, Verdict, answer, close, decode,
                               encode, equals, make_checker, read_records, run_check,
                               same_expression, same_schedule, tensor_close)
from autograder.checks.codec import dumps_record
from autograder.checks.expr import ExpressionError, parse_expression
from autograder.verify import module_problems, verify_records
from paralab.schedules import one_f_one_b

FIXTURE_CHECKS = os.path.join(os.path.dirname(__file__), "fixtures", "toy_course",
                              "autograder", "checks")


def roundtrip(value, symbols=()):
    return decode(json.loads(json.dumps(encode(value))), symbols)


@pytest.mark.parametrize("value", [None, True, 0, -3, 2**80, 1.5, "text", [1, [2, 3]],
                                   (1, "a"), {"k": 1, 2: [3]}, {1, 2}, Fraction(3, 11),
                                   ((1, 2), (3, 4))])
def test_plain_values_roundtrip_with_their_types(value):
    back = roundtrip(value)
    assert back == value and type(back) is type(value)


def test_non_finite_floats_roundtrip():
    back = roundtrip([math.inf, -math.inf, math.nan])
    assert back[0] == math.inf and back[1] == -math.inf and math.isnan(back[2])


def test_sympy_tensor_numpy_and_schedule_roundtrip():
    p, m = sp.symbols("p m", positive=True)
    expr = (p - 1) / (m + p - 1)
    back = roundtrip(expr, ["p", "m"])
    assert sp.simplify(back - expr.subs({p: sp.Symbol("p"), m: sp.Symbol("m")})) == 0
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    tb = roundtrip(t)
    assert tb.dtype == torch.float32 and torch.equal(tb, t)
    assert roundtrip(torch.tensor([True, False])).dtype == torch.bool
    assert roundtrip(torch.zeros(0, 3)).shape == (0, 3)
    import numpy as np
    a = np.arange(4.0).reshape(2, 2)
    assert np.array_equal(roundtrip(a), a) and roundtrip(np.int64(7)) == 7
    s = one_f_one_b(3, 4)
    assert roundtrip(s).to_strings() == s.to_strings()


def test_symbols_given_as_objects_keep_their_assumptions():
    p = sp.Symbol("p", positive=True)
    back = decode(encode(sp.sqrt(p**2)), [p])
    assert back == p


def test_unencodable_values_fail_the_check_with_a_message():
    enc = encode(object())
    assert enc == {"unencodable": "object"}
    with pytest.raises(DecodeError, match="could not be recorded"):
        decode(enc)


@pytest.mark.parametrize("bad", [
    {"tensor": [[1, 2], [3]], "dtype": "float32", "shape": [2, 2]},
    {"tensor": [1, 2], "dtype": "float32", "shape": [10**7, 10**7]},
    {"tensor": [1, "x"], "dtype": "float32", "shape": [2]},
    {"tensor": [1, 2], "dtype": "object", "shape": [2]},
    {"fraction": "1/0"},
    {"sympy": "__import__('os').system('true')"},
    {"schedule": [["0F0", "0Q0"]], "num_microbatches": 1, "num_stages": 1},
    {"what": 1},
    {"tuple": "notalist"},
])
def test_decoding_refuses_malformed_or_hostile_records(bad):
    with pytest.raises(DecodeError):
        decode(bad, ["p"])


def test_decoding_refuses_deep_nesting():
    deep = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(DecodeError, match="nested"):
        decode(deep)


@pytest.mark.parametrize("text", ["(p - 1)/(m + p - 1)", "t_f*(p - 1) + 2*t_b", "-p**2",
                                  "2**-1", "sqrt(p)/2", "Max(m, p)", "0.5*p", "3/4", "pi*p",
                                  "1.0e-5*m"])
def test_expression_parser_reads_what_sympy_prints(text):
    names = ["p", "m", "t_f", "t_b"]
    expr = parse_expression(text, names)
    assert sp.simplify(parse_expression(str(expr), names) - expr) == 0
    assert sp.simplify(expr - sp.sympify(text, locals={n: sp.Symbol(n) for n in names})) == 0


@pytest.mark.parametrize("text", ["__import__('os')", "p.__class__", "x", "lambda: 1",
                                  "open('f')", "9**9**9**9", "2**10**4", "(10**40)**(10**40)",
                                  "(" * 200 + "p" + ")" * 200, "1" * 60, "p[0]", "p;q",
                                  "1/0", "", "p +", "eval"])
def test_expression_parser_refuses_anything_else(text):
    with pytest.raises(ExpressionError):
        parse_expression(text, ["p", "m"])


def test_checker_records_checks_and_prints_one_line_per_check(tmp_path, monkeypatch, capsys):
    path = tmp_path / "answers.jsonl"
    monkeypatch.setenv("PARALAB_ANSWERS", str(path))
    check = make_checker({"x": equals(3, hint="x counts the ranks"), "y": equals(5)})
    check("x", 3)
    assert capsys.readouterr().out == "\u2713 x: correct\n"
    check("x", 4)  # a failure does not raise: the checks after it still run
    check("y", 5)
    out, err = capsys.readouterr()
    assert err == "\u2717 x: x counts the ranks\n" and out == "\u2713 y: correct\n"
    records, problems = read_records(path.read_text().splitlines())
    assert records == {"x": 4, "y": 5} and problems == []  # the last record of a key wins


def test_checker_reads_the_variable_named_by_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARALAB_ANSWERS", str(tmp_path / "answers.jsonl"))
    check = make_checker({"answer_xy": equals(7), "nowhere_defined": equals(1)})
    namespace = {"check": check, "answer_xy": 7}
    exec("check('answer_xy')\ncheck('nowhere_defined')", namespace)
    out, err = capsys.readouterr()
    assert out == "\u2713 answer_xy: correct\n"
    assert err.startswith("\u2717 nowhere_defined: nowhere_defined is not defined: write")
    records, _ = read_records((tmp_path / "answers.jsonl").read_text().splitlines())
    assert decode(records["nowhere_defined"]) == Raised(Raised.NOT_DEFINED,
                                                        decode(records["nowhere_defined"])
                                                        .message)


def test_checker_turns_an_exception_of_the_students_code_into_a_failed_answer(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARALAB_ANSWERS", str(tmp_path / "answers.jsonl"))
    check = make_checker({"s": equals([1, 2]), "t": equals(1)})
    namespace = {"check": check}
    cell = "def build(n):\n    return [1, 2][n + 5]\n"
    linecache.cache["<cell 3>"] = (len(cell), None, cell.splitlines(True), "<cell 3>")  # as IPython
    exec(compile(cell, "<cell 3>", "exec"), namespace)
    exec("check('s', lambda: build(0))\ncheck('t', lambda: 1)", namespace)
    out, err = capsys.readouterr()
    assert err == ("\u2717 s: your code raised IndexError: list index out of range (in build, "
                   "line 2: return [1, 2][n + 5])\n")
    assert out == "\u2713 t: correct\n"
    records, _ = read_records((tmp_path / "answers.jsonl").read_text().splitlines())
    verdict = run_check({"s": equals([1, 2])}, "s", records["s"])
    assert not verdict.passed and "IndexError" in verdict.message  # the clean process agrees


def test_a_crafted_record_fails_its_check_only():
    checks = {"a": tensor_close(torch.ones(1)), "b": equals(2)}
    huge = {"tensor": [10 ** 400], "dtype": "float64", "shape": [1]}
    assert run_check(checks, "a", huge) == (False, "the recorded array cannot be rebuilt "
                                                   "(OverflowError)")
    too_big_int = {"ndarray": [10 ** 30], "dtype": "int64", "shape": [1]}
    assert not run_check(checks, "a", too_big_int).passed
    assert run_check(checks, "b", 2).passed


def test_checker_does_not_write_without_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("PARALAB_ANSWERS", raising=False)
    monkeypatch.chdir(tmp_path)
    make_checker({"x": equals(1)})("x", 1)
    answer("y", 2)
    assert list(tmp_path.iterdir()) == []


def test_ready_made_checks():
    p, m = sp.symbols("p m")
    assert same_expression((p - 1) / (m + p - 1))(1 - m / (m + p - 1)).passed
    assert same_expression(p / 2)(0.5 * p).passed
    bad = same_expression((p - 1) / (m + p - 1), reveal=False)((p - 1) / m)
    assert not bad.passed and "m + p - 1" not in bad.message
    assert not same_expression(p)(p + sp.Symbol("q")).passed
    assert close(0.1, rel=1e-6)(Fraction(1, 10)).passed and not close(1.0)("1.0").passed
    assert tensor_close(torch.ones(2, 2))(torch.ones(2, 2, dtype=torch.float64)).passed
    assert "shape" in tensor_close(torch.ones(2, 2))(torch.ones(4)).message
    s = one_f_one_b(2, 2)
    assert same_schedule(s)(s).passed
    assert "rank 0" in same_schedule(s)(one_f_one_b(2, 3)).message


def test_verify_uses_last_record_and_reports_every_check():
    class Module:
        CHECKS = {"a": equals(1), "b": equals(2), "c": lambda v: 1 / 0}
        GRADE_CELLS = {"t1": ["a"], "t2": ["b", "a"], "t3": ["c"]}
    records, _ = read_records([dumps_record("a", 0), dumps_record("a", 1),
                               dumps_record("c", 5), "not json", '{"key": 1}'])
    out = verify_records(Module, records)
    assert out["t1"]["passed"] is True and out["t1"]["score"] == 1
    assert out["t2"]["passed"] is False and out["t2"]["score"] == 0.5
    assert [(c["key"], c["passed"]) for c in out["t2"]["checks"]] == [("b", False), ("a", True)]
    assert "no answer was recorded" in out["t2"]["checks"][0]["message"]
    assert out["t2"]["message"].splitlines()[1] == "\u2713 a: correct"
    assert out["t3"]["score"] == 0 and "could not be checked" in out["t3"]["message"]


def test_verify_splits_a_cell_by_its_weights_and_reads_probe_keys_from_the_probe_only():
    class Module:
        CHECKS = {"a": equals(1), "b": equals(2), "own": equals(3)}
        GRADE_CELLS = {"t1": {"a": 3, "b": 1}, "t2": ["own"]}
        PROBES = {"own": Probe(cells=("d",), call="f()", unavailable=())}
    kernel = {"a": 1, "b": 0, "own": 3}  # the kernel's "own" must not count
    out = verify_records(Module, kernel, {})
    assert out["t1"]["score"] == 0.75 and out["t2"]["score"] == 0
    assert "without the library did not finish" in out["t2"]["checks"][0]["message"]
    assert verify_records(Module, kernel, {"own": 3})["t2"]["score"] == 1


def test_module_problems_name_what_to_fix():
    class Bad:
        CHECKS = {"a": equals(1), "b": 3}
        GRADE_CELLS = {"t1": ["a", "zz"], "t2": []}
    problems = " ".join(module_problems(Bad))
    assert "'zz', which is not in CHECKS" in problems
    assert "CHECKS['b'] is not callable" in problems
    assert "GRADE_CELLS['t2'] must be a non-empty list" in problems

    class Overlapping:
        CHECKS = {"a": equals(1)}
        GRADE_CELLS = {"t1": ["a"], "t2": {"a": 0}}
        PROBES = {"zz": Probe(cells=(), call="1", unavailable=())}
    problems = " ".join(module_problems(Overlapping))
    assert "weights must be positive" in problems and "listed by both" in problems
    assert "PROBES lists 'zz', which no GRADE_CELLS entry lists" in problems


def test_verify_command_in_a_fresh_process(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(dumps_record("product", 42) + "\n" + dumps_record("double_visible", 6)
                    + "\n" + dumps_record("double_hidden", [0, -8, 2 * 10**6, 5.0]) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = [sys.executable, "-m", "autograder.verify", "mini", "--checks-path", FIXTURE_CHECKS]
    one = subprocess.run(base + [str(good)], capture_output=True, text=True, check=True)
    assert {k: v["passed"] for k, v in json.loads(one.stdout).items()} == \
        {"test_product": True, "test_double": True}
    batch = subprocess.run(base + ["--batch", str(good), str(empty)], capture_output=True,
                           text=True, check=True)
    result = json.loads(batch.stdout)
    assert result[str(good)]["test_double"]["passed"]
    assert not result[str(empty)]["test_product"]["passed"]
    missing = subprocess.run([sys.executable, "-m", "autograder.verify", "no_such_assignment",
                              str(good)], capture_output=True, text=True)
    assert missing.returncode == 2 and "no check module" in missing.stderr


def test_verdict_is_a_pair():
    assert Verdict(True, "ok") == (True, "ok")


def test_formula_check_explains_each_kind_of_wrong_formula():
    from autograder.checks import formula_check

    p, m, t = sp.symbols("p m t", positive=True)
    check = formula_check((m + p - 1) * t, [(m * t, "that is the ideal time"), (8, "eight?")],
                          symbols={"p": p, "m": m, "t": t},
                          evaluate=lambda x: x.subs({p: 4, m: 8, t: 2}),
                          where="at p=4, m=8, t=2")
    plain = sp.symbols("p m t")  # a kernel's symbols, without the assumptions
    assert check((plain[1] + plain[0] - 1) * plain[2]).passed
    assert check(1.0 * (m + p - 1) * t).passed                   # floats read as rationals
    assert check(m * t).message == "that is the ideal time"
    assert check(8).message == "eight?"                          # a known wrong number
    assert check(22).message == ("expected a formula in m, p, t, got a number: use the "
                                 "symbols defined at the top of the notebook")
    x = sp.Symbol("x")
    assert check(x * t).message == "t*x depends on x; the answer depends only on m, p, t"
    assert check((m + p) * t).message == ("t*(m + p) is not equivalent to the right formula: "
                                          "at p=4, m=8, t=2 it gives 24, the right one 22")
    bare = formula_check(m * t, right="the paper's formula")
    assert bare(2 * m * t).message == "2*m*t is not the paper's formula"
