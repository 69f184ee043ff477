"""Closed forms of the course, derived with SymPy from the parts they are made of.

The pipeline formulas are *built*, not typed: a step time is the sum of named parts (fill,
steady state, drain), and the ratios are quotients of those sums, simplified by SymPy.  The
tests check every one against the dependency simulator, exactly (and the tensor-parallel
shapes against real torch tensors), so a notebook can show
``evaluate(gpipe_time(), p=4, m=8, t_f=2, t_b=4) == 66`` and know where 66 comes from.

Pipeline symbols (per *rank*: ``t_f`` is one microbatch's forward through a rank's share of
the model, whatever the number ``v`` of chunks that share is cut into):

``p`` ranks (pipeline stages), ``m`` microbatches, ``v`` chunks per rank (interleaved),
``t_f`` forward, ``t_b`` backward (input gradient), ``t_w`` weight gradient, ``r`` a rank.
A schedule that does not split the backward (GPipe, 1F1B) pays ``t_b + t_w`` per backward;
pass ``with_w=True`` to see it, otherwise ``t_b`` stands for the whole backward.

Tensor-parallel symbols: ``B`` batch, ``S`` sequence, ``d`` hidden size, ``P`` tensor-parallel
degree, ``e`` (also exported as ``bytes_per_element``) bytes per element (4 for fp32).

Three quantities are all called "bubble ratio" somewhere; they are different numbers:

* ``time_ratio = T / T_ideal`` = (m+p-1)/m -- how much longer the step is than with no
  bubble (1.375 for p=4, m=8);
* ``bubble_overhead = bubble / T_ideal`` = (p-1)/m -- Megatron-LM's "bubble time fraction"
  (Narayanan et al. 2021, section 2.2) (0.375);
* ``bubble_fraction = bubble / T`` = (p-1)/(m+p-1) -- the idle share of the step, GPipe's
  O((K-1)/(M+K-1)) (Huang et al. 2019, section 2.3) (3/11).

References: GPipe (Huang et al. 2019, section 2.3); Megatron-LM (Shoeybi et al. 2019,
section 3, for the tensor-parallel MLP; Narayanan et al. 2021, section 2.2 for 1F1B and the
interleaved schedule, 2.3 for tensor parallelism); Zero Bubble Pipeline Parallelism (Qi et
al. 2024) for ZB-H1.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping

import sympy as sp

from .layouts import FFN_VARIANTS, check_variant  # noqa: F401 - formulas.FFN_VARIANTS

# -- symbols ---------------------------------------------------------------------------------
p, m, v = sp.symbols("p m v", positive=True, integer=True)
t_f, t_b, t_w = sp.symbols("t_f t_b t_w", positive=True)
r = sp.Symbol("r", integer=True, nonnegative=True)
B, S, d, P = sp.symbols("B S d P", positive=True, integer=True)
e = bytes_per_element = sp.Symbol("e", positive=True)

SYMBOLS = {s.name: s for s in (p, m, v, t_f, t_b, t_w, r, B, S, d, P, e)}
SYMBOLS["bytes_per_element"] = e

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")

# The DeepSeek-V3 report's notation (Table 2), per *chunk* of the model: ``F`` a forward,
# ``B`` a FULL backward (input and weight gradients), ``W`` its weight-gradient part, ``FB``
# (F&B) a forward and a full backward of two microbatches overlapped, ``PP`` the number of
# pipeline stages.  Kept apart from SYMBOLS: its ``B`` is not the batch size, and not our
# ``t_b`` either (``B = t_b + t_w``).
PP = sp.Symbol("PP", positive=True, integer=True)
F_chunk, B_full, W_chunk, FB = sp.symbols("F B W FB", positive=True)
DEEPSEEK_SYMBOLS = {"PP": PP, "F": F_chunk, "B": B_full, "W": W_chunk, "FB": FB}


def _backward(with_w: bool):
    """What one backward costs: ``t_b``, or ``t_b + t_w`` when it also computes W."""
    return t_b + t_w if with_w else t_b


# -- GPipe and 1F1B --------------------------------------------------------------------------
def gpipe_time_derivation(with_w: bool = False) -> dict:
    """GPipe's step time as the sum of what the *last* stage sees (Huang et al. 2019, §2.3).

    * ``fill``: microbatch 0 crosses the ``p-1`` stages before the last one, one forward
      each, before the last stage can start: ``(p-1) t_f``;
    * ``forward_steady``: from then on the last stage runs its ``m`` forwards back to back
      (each next microbatch is already waiting): ``m t_f``;
    * ``backward_steady``: then its ``m`` backwards, also back to back: ``m t_b``;
    * ``drain``: the last gradient still has to cross the ``p-1`` earlier stages: ``(p-1) t_b``.

    ``total`` is their sum, factored: ``(m+p-1)(t_f+t_b)`` -- every rank works ``m`` slots
    and waits ``p-1``.  With ``with_w`` the backward also computes the weight gradient."""
    back = _backward(with_w)
    parts = {
        "fill": (p - 1) * t_f,
        "forward_steady": m * t_f,
        "backward_steady": m * back,
        "drain": (p - 1) * back,
    }
    parts["total"] = sp.factor(sum(parts.values()))
    return parts


def gpipe_time(with_w: bool = False):
    """GPipe step time: the ``total`` of :func:`gpipe_time_derivation`."""
    return gpipe_time_derivation(with_w)["total"]


def one_f_one_b_time_derivation(with_w: bool = False) -> dict:
    """1F1B's step time from the last stage's point of view (Narayanan et al. 2021, §2.2).

    The last stage starts after the same fill ``(p-1) t_f``; it then alternates one forward
    and one backward with no gap (its warm-up is empty, and the next forward has always
    arrived while it ran a backward): ``m (t_f + t_b)``; the last gradient then crosses
    the other ``p-1`` stages: ``(p-1) t_b``.  The parts are GPipe's regrouped, so the step
    time is *the same*: 1F1B does not shrink the bubble at equal ``m``.  What it changes is
    memory -- rank ``r`` holds at most ``p-r`` microbatches instead of ``m`` -- which is what
    lets one raise ``m``, and *that* shrinks the bubble."""
    back = _backward(with_w)
    parts = {
        "fill": (p - 1) * t_f,
        "steady": m * (t_f + back),
        "drain": (p - 1) * back,
    }
    parts["total"] = sp.factor(sum(parts.values()))
    return parts


def one_f_one_b_time(with_w: bool = False):
    """1F1B step time; equal to :func:`gpipe_time` (see the derivation's docstring)."""
    return one_f_one_b_time_derivation(with_w)["total"]


def ideal_time(with_w: bool = False):
    """The step time with no bubble: one rank's own work, ``m`` forwards and ``m`` backwards
    (and ``m`` weight-gradient passes with ``with_w``).  The same for every schedule, since
    they all do the same work and only order it differently."""
    work = m * t_f + m * _backward(with_w)
    return sp.factor(work)


# -- interleaved 1F1B --------------------------------------------------------------------------
def interleaved_time_derivation() -> dict:
    """Interleaved 1F1B (Narayanan et al. 2021, §2.2.2): each rank holds ``v`` chunks of
    ``1/v`` of its layers, so a forward through one chunk costs ``t_f / v``.

    The last rank again waits for microbatch 0 to cross ``p-1`` stages -- but they are
    first-chunk stages, ``t_f / v`` each: ``fill = (p-1) t_f / v``; then it is never idle
    (``work = m (t_f + t_b)``, the same total work); and the last gradient crosses ``p-1``
    first-chunk stages back: ``drain = (p-1) t_b / v``.  Fill and drain are ``v`` times
    shorter, at the price of ``v`` times more point-to-point messages."""
    parts = {
        "fill": (p - 1) * t_f / v,
        "work": m * (t_f + t_b),
        "drain": (p - 1) * t_b / v,
    }
    parts["total"] = sp.factor(sum(parts.values()))
    return parts


def interleaved_time():
    """Interleaved 1F1B step time ``m (t_f+t_b) + (p-1)(t_f+t_b)/v`` for any ``m >= p``
    (with the microbatch groups of :func:`paralab.schedules.interleaved_one_f_one_b`): the
    work plus the fill and drain of :func:`interleaved_time_derivation`."""
    parts = interleaved_time_derivation()
    return parts["work"] + sp.factor(parts["fill"] + parts["drain"])


# -- ZB-H1 --------------------------------------------------------------------------------------
def rank0_idle_derivation(schedule: str = "zb-h1") -> dict:
    """Where rank 0 waits, for 1F1B with a backward that includes W, and for ZB-H1.

    Every rank does the same work, and rank 0 is never idle at the end, so its idle time
    is the bubble.  It waits twice over (Qi et al. 2024):

    * ``first_gradient_wait``: after its forwards it waits for the gradient of microbatch 0
      to come back across ``p-1`` stages.  In 1F1B each of them runs a full backward
      (``t_b + t_w``) before passing it on; in ZB-H1 each runs only B (``t_b``) and keeps
      its W for later (rank ``r`` may owe up to ``r`` of them).
    * ``cooldown_waits``: once rank 0 has no forwards left, each of the last ``p-1``
      gradients arrives one forward plus one backward (as the ranks behind it run them)
      after the previous one, while rank 0 itself only has a backward to do: it waits
      ``t_f`` each time in 1F1B (arrivals every ``t_f + t_b + t_w``, work ``t_b + t_w``), and
      ``t_f - t_w`` in ZB-H1 (arrivals every ``t_f + t_b``, since the ranks behind pass B on
      and keep their W's; work ``t_b + t_w``, its B and its own W).

    Valid (and checked against the simulator) for ``m >= p`` and ``t_w <= min(t_f, t_b)``."""
    if schedule == "zb-h1":
        parts = {"first_gradient_wait": (p - 1) * t_b, "cooldown_waits": (p - 1) * (t_f - t_w)}
    elif schedule in ("1f1b", "1f1b+w"):
        parts = {"first_gradient_wait": (p - 1) * (t_b + t_w), "cooldown_waits": (p - 1) * t_f}
    else:
        raise ValueError(f"rank0_idle_derivation knows '1f1b' and 'zb-h1', not {schedule!r}")
    parts["total"] = sp.factor(sum(parts.values()))
    return parts


def zb_h1_bubble():
    """ZB-H1's bubble ``(p-1)(t_f + t_b - t_w)`` (Qi et al. 2024): the total of
    :func:`rank0_idle_derivation`.  One third of 1F1B's ``(p-1)(t_f+t_b+t_w)`` when
    ``t_f = t_b = t_w``.  Valid for ``m >= p`` and ``t_w <= min(t_f, t_b)``: with fewer
    microbatches there is no steady state to hide the W's in, and a W longer than a forward
    or a backward delays the gradients it was meant to let through."""
    return rank0_idle_derivation("zb-h1")["total"]


def zb_h1_time():
    """ZB-H1 step time: the work ``m (t_f + t_b + t_w)`` plus :func:`zb_h1_bubble`.
    Valid for ``m >= p`` and ``t_w <= min(t_f, t_b)``."""
    return ideal_time(with_w=True) + zb_h1_bubble()


# -- ZB-H2, and the papers' tables -----------------------------------------------------------------
def zb_h2_bubble():
    """ZB-H2's bubble ``(p-1)(t_f + t_b - 2 t_w)`` (Qi et al. 2024, section 2.2): zero when
    ``t_f + t_b = 2 t_w``, e.g. all three equal.

    It is the idle time *inside* a rank's span -- from its first forward to its last W --
    (:attr:`paralab.timeline.Timeline.span_idle`, largest on rank 0): ZB-H2's layout is a
    parallelogram, rank ``r`` starts ``r t_f`` after rank 0 and ends after it too, and that
    shift is not lost when the next step's forwards start on each rank as soon as it is
    done (no global synchronisation between steps: the paper's optimizer post-validation).
    Checked against the simulator for ``m >= 2p - 1`` and ``t_w <= min(t_f, t_b)``."""
    return (p - 1) * (t_f + t_b - 2 * t_w)


def zb_paper_table() -> dict:
    """The Zero Bubble paper's comparison (Qi et al. 2024, section 2), in its notation: ``t_b``
    is the backward for the stage *input* only, so a full backward costs ``t_b + t_w``.
    Per schedule: ``bubble`` (a rank's idle time per step) and ``peak_activations`` (most
    microbatches whose activations rank 0 holds: ``p M_B`` and ``(2p-1) M_B`` there)."""
    return {
        "1f1b": {"bubble": bubble_time("1f1b", with_w=True), "peak_activations": p},
        "zb-h1": {"bubble": zb_h1_bubble(), "peak_activations": p},
        "zb-h2": {"bubble": zb_h2_bubble(), "peak_activations": 2 * p - 1},
    }


def deepseek_table() -> dict:
    """Table 2 of the DeepSeek-V3 report (DualPipe), in its notation (:data:`DEEPSEEK_SYMBOLS`:
    per chunk, ``B`` the FULL backward).  Per schedule: ``bubble``, ``parameters`` per rank
    (1 = one chunk, a ``1/PP`` share of the model) and ``activations`` (most chunk
    activations a rank holds).

    * 1F1B, ``(PP-1)(F+B)``: the (p-1)(t_f+t_b+t_w) of the Zero Bubble paper, with B full;
    * ZB1P (= ZB-H1), ``(PP-1)(F+B-2W)``: the Zero Bubble paper's (p-1)(t_f+t_b-t_w), whose
      ``t_b`` is the input-gradient part only, ``B - W`` -- the same number written twice;
    * DualPipe, ``(PP/2-1)(F&B+B-3W)``, two copies of the parameters and ``PP+1`` chunk
      activations; DualPipeV (one copy cut in half: ``PP`` chunks on ``PP/2`` ranks) has the
      same bubble and memory per rank.  The simulator reproduces it (largest idle time of a
      rank, :func:`paralab.schedules.dualpipe_v` with ``PP = 2p``) when ``F = B - W``,
      ``W <= F`` and ``max(F, B) <= F&B <= F + B``: the report's costs are those of a
      balanced model, whose forward costs as much as the input-gradient backward."""
    return {
        "1f1b": {"bubble": (PP - 1) * (F_chunk + B_full), "parameters": sp.Integer(1),
                 "activations": PP},
        "zb1p": {"bubble": (PP - 1) * (F_chunk + B_full - 2 * W_chunk),
                 "parameters": sp.Integer(1), "activations": PP},
        "dualpipe": {"bubble": (PP / 2 - 1) * (FB + B_full - 3 * W_chunk),
                     "parameters": sp.Integer(2), "activations": PP + 1},
    }


def from_deepseek(expr, num_stages=None):
    """``expr`` in DeepSeek's notation rewritten in ours: ``F -> t_f``, ``B -> t_b + t_w``
    (the full backward), ``W -> t_w``, ``FB`` stays, and ``PP -> num_stages`` (default
    ``p``: one stage per rank, as in 1F1B and ZB-H1).  With it, DeepSeek's ZB1P row *is*
    :func:`zb_h1_bubble`."""
    stages = p if num_stages is None else num_stages
    return sp.expand(expr.subs({F_chunk: t_f, B_full: t_b + t_w, W_chunk: t_w, PP: stages}))


# -- bubbles and the three ratios -------------------------------------------------------------
def step_time(schedule: str = "1f1b", with_w: bool = False):
    """Step time of a schedule by its CLI name (``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``).

    ``zb-h1`` always includes ``t_w`` (it exists to place W); ``with_w`` applies to the others."""
    if schedule == "gpipe":
        return gpipe_time(with_w)
    if schedule == "1f1b":
        return one_f_one_b_time(with_w)
    if schedule == "interleaved":
        if with_w:
            raise ValueError("the interleaved formulas take t_b as the whole backward; "
                             "pass t_b + t_w for it instead of with_w")
        return interleaved_time()
    if schedule == "zb-h1":
        return zb_h1_time()
    raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


def bubble_time(schedule: str = "1f1b", with_w: bool = False):
    """Idle time per rank: step time minus the ideal, simplified.  For GPipe and 1F1B this
    is ``(p-1)(t_f+t_b)`` -- ``(p-1)(t_f+t_b+t_w)`` with ``with_w``."""
    ideal = ideal_time(with_w=with_w or schedule == "zb-h1")
    return sp.factor(sp.simplify(step_time(schedule, with_w) - ideal))


def time_ratio(schedule: str = "1f1b"):
    """``T / T_ideal``: (m+p-1)/m for GPipe and 1F1B (1.375 for p=4, m=8)."""
    return sp.factor(step_time(schedule) / ideal_time(with_w=schedule == "zb-h1"))


def bubble_overhead(schedule: str = "1f1b"):
    """``bubble / T_ideal``: (p-1)/m for GPipe and 1F1B -- Megatron-LM's bubble fraction
    (Narayanan et al. 2021, §2.2) (0.375 for p=4, m=8)."""
    return sp.factor(bubble_time(schedule) / ideal_time(with_w=schedule == "zb-h1"))


def bubble_fraction(schedule: str = "1f1b"):
    """``bubble / T``: (p-1)/(m+p-1) for GPipe and 1F1B -- the share of the step a rank
    is idle, GPipe's (Huang et al. 2019, §2.3) (3/11 for p=4, m=8)."""
    return sp.factor(bubble_time(schedule) / step_time(schedule))


def interleaved_bubble_overhead():
    """Interleaved ``bubble / T_ideal = (p-1)/(v m)``: ``v`` times less than 1F1B's."""
    return bubble_overhead("interleaved")


def interleaved_bubble_fraction():
    """Interleaved ``bubble / T = ((p-1)/v) / (m + (p-1)/v) = (p-1)/(v m + p - 1)``.

    GPT-3-scale check (p=8): v=2, m=64 gives 7/135, against 7/71 without interleaving."""
    return bubble_fraction("interleaved")


# -- activation memory ----------------------------------------------------------------------------
def _forwards_in_total(schedule: str):
    """Forwards a rank runs in one step (chunk forwards for interleaved)."""
    return m * v if schedule == "interleaved" else m


def _warmup_wanted(schedule: str, rank, group=None):
    if schedule == "gpipe":
        return m
    if schedule in ("1f1b", "zb-h1"):
        return p - rank - 1
    if schedule == "zb-h2":
        return 2 * (p - rank - 1)
    if schedule == "interleaved":
        return 2 * (p - rank - 1) + (v - 1) * (p if group is None else group)
    raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


def warmup_forwards(schedule: str, rank=r, group=None):
    """Forwards rank ``rank`` runs before its first backward (chunk forwards for interleaved).

    GPipe runs all ``m``.  1F1B (and ZB-H1, which keeps its F/B order) runs ``p-r-1``: just
    enough that a gradient can arrive as it finishes; ZB-H2 twice that, ``2(p-r-1)``, to
    stay busy until then.  Interleaved runs ``2(p-r-1)`` plus one group of ``group``
    microbatches (default ``p``) for each chunk after the first -- Megatron-LM's warm-up.
    Never more than there are."""
    if schedule == "gpipe":
        return m
    return sp.Min(_forwards_in_total(schedule), _warmup_wanted(schedule, rank, group))


def peak_activations(schedule: str, rank=r, group=None):
    """Most (microbatch, stage) activations rank ``rank`` holds at once (in chunk units for
    interleaved).  GPipe holds all ``m``.  The others hold their warm-up forwards plus the
    one forward of the steady state that runs before the first backward frees anything;
    never more than they run in total: ``min(m, p-r)`` for 1F1B and ZB-H1, ``min(m,
    2(p-r)-1)`` for ZB-H2, ``min(m v, 2(p-r-1) + (v-1)N + 1)`` for interleaved with groups
    of ``N = group`` microbatches (default ``p``; see
    :func:`paralab.schedules.megatron_group_size` when ``p`` does not divide ``m``)."""
    if schedule == "gpipe":
        return m
    return sp.Min(_forwards_in_total(schedule), _warmup_wanted(schedule, rank, group) + 1)


# -- how many microbatches? -----------------------------------------------------------------------
_QUANTITIES = {"bubble_fraction": bubble_fraction, "bubble_overhead": bubble_overhead,
               "time_ratio": time_ratio}


def min_microbatches(p_value: int, target, quantity: str = "bubble_fraction",
                     v_value: int | None = None) -> int:
    """The smallest ``m`` whose ``quantity`` is at most ``target``.

    ``quantity`` is ``bubble_fraction`` (bubble/T), ``bubble_overhead`` (bubble/ideal) or
    ``time_ratio`` (T/ideal, then ``target`` is e.g. 1.05).  With ``v_value`` the interleaved
    formulas are used (and the answer is rounded up to a multiple of ``p``, Megatron's
    default group size; any ``m >= p`` also works, see
    :func:`paralab.schedules.interleaved_one_f_one_b`).  SymPy solves the inequality over
    the reals; the answer is the first integer in the solution set.
    Floats are read as the decimal they print as (0.05 -> 1/20), so the answer is exact.

    >>> min_microbatches(4, 0.05)
    57
    """
    if quantity not in _QUANTITIES:
        raise ValueError(f"quantity must be one of {', '.join(_QUANTITIES)}, not {quantity!r}")
    goal = _exact(target)
    schedule = "1f1b" if v_value is None else "interleaved"
    values = {p: _exact(p_value)}
    if v_value is not None:
        values[v] = _exact(v_value)
    m_real = sp.Symbol("m_real", positive=True)
    expression = _QUANTITIES[quantity](schedule).subs(values).subs(m, m_real)
    solution = sp.solve_univariate_inequality(expression <= goal, m_real, relational=False,
                                              domain=sp.Interval.open(0, sp.oo))
    if solution.is_empty:
        raise ValueError(f"no number of microbatches brings {quantity} to {target} or below "
                         f"with p={p_value}: it only approaches its limit "
                         f"{sp.limit(expression, m_real, sp.oo)} as m grows")
    low = sp.Min(*solution.boundary) if solution.boundary else sp.Integer(1)
    answer = max(1, int(sp.ceiling(low)))
    if answer not in solution:
        answer += 1
    if v_value is not None:
        answer += (-answer) % int(p_value)
    return answer


# -- evaluating ----------------------------------------------------------------------------------
def _exact(value):
    """A number as an exact SymPy number: ints, Fractions, "1/3" strings, floats by their
    decimal representation (0.1 -> 1/10)."""
    if isinstance(value, sp.Basic):
        return value
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    if isinstance(value, int):
        return sp.Integer(value)
    if isinstance(value, Fraction):
        return sp.Rational(value.numerator, value.denominator)
    if isinstance(value, float):
        return sp.Rational(repr(float(value)))
    if isinstance(value, str):
        return sp.Rational(Fraction(value.strip()))
    if isinstance(value, numbers.Integral):  # e.g. numpy integers
        return sp.Integer(int(value))
    if isinstance(value, numbers.Rational):
        return sp.Rational(int(value.numerator), int(value.denominator))
    if isinstance(value, numbers.Real):
        return sp.Rational(repr(float(value)))
    raise TypeError(f"expected a number, got {value!r}")


def evaluate(expr, **values):
    """Substitute numbers for symbols, by name, exactly.

    ``evaluate(gpipe_time(), p=4, m=8, t_f=2, t_b=4)`` is ``Integer(66)``.  Names are the
    symbols' names (``p m v t_f t_b t_w r B S d P e``; ``bytes_per_element`` for ``e``).
    Symbols not given stay symbolic.  Dicts (derivations), tuples (shapes) and lists are
    evaluated element by element."""
    unknown = sorted(set(values) - set(SYMBOLS))
    if unknown:
        raise ValueError(f"unknown symbol name(s) {', '.join(unknown)}; the symbols are "
                         f"{', '.join(SYMBOLS)}")
    substitutions = {SYMBOLS[name]: _exact(value) for name, value in values.items()}
    return _substitute(expr, substitutions)


def _substitute(expr, substitutions):
    if isinstance(expr, Mapping):
        return type(expr)((k, _substitute(x, substitutions)) for k, x in expr.items())
    if isinstance(expr, (tuple, list)):
        return type(expr)(_substitute(x, substitutions) for x in expr)
    if isinstance(expr, Collective):
        return Collective(expr.layer, expr.phase, expr.op, expr.tensor,
                          _substitute(expr.elements, substitutions))
    result = sp.sympify(expr).subs(substitutions)
    return result if result.is_Rational else sp.simplify(result)


# -- tensor parallelism: the FFN of the homework --------------------------------------------------
# The variant names (FFN_VARIANTS) are defined in paralab.layouts, shared with paralab.tp.


def ffn_shapes(variant: str = "col-row") -> "OrderedDict[str, tuple]":
    """Shapes in the FFN ``Z = GeLU(X @ W1) @ W2`` (X: B x S x d, W1: d x 4d, W2: 4d x d),
    split over ``P`` ranks.  Math convention: ``X @ W`` with ``W`` stored in x out, so a
    *column*-parallel layer splits W's output dimension (each rank computes some output
    features completely) and a *row*-parallel one splits its input dimension (each rank
    computes a partial sum of every output feature).

    Names: full logical tensors (``X``, ``W1``, ``Y`` = GeLU output, ``W2``, ``Z``) and what one
    rank holds (``*_shard``: a slice; ``*_partial``: a full-size partial sum).

    * ``col-row`` (Megatron-LM, Shoeybi et al. 2019 §3): Linear1 column-parallel, so GeLU
      acts on complete features locally; Linear2 row-parallel consumes exactly that shard.
    * ``row-row``: Linear1 row-parallel needs X split along d (a free local slice); its
      output is a partial sum, and GeLU of a partial sum is not the partial sum of GeLUs.
    * ``col-col``: Linear2 column-parallel needs the complete Y, and produces a column shard
      of Z."""
    check_variant(variant)
    four_d = 4 * d
    shapes: OrderedDict = OrderedDict()
    shapes["X"] = (B, S, d)
    shapes["W1"] = (d, four_d)
    if variant == "col-row":
        shapes["W1_shard"] = (d, four_d / P)
        shapes["Y_shard"] = (B, S, four_d / P)
        shapes["Y"] = (B, S, four_d)
        shapes["W2"] = (four_d, d)
        shapes["W2_shard"] = (four_d / P, d)
        shapes["Z_partial"] = (B, S, d)
    elif variant == "row-row":
        shapes["X_shard"] = (B, S, d / P)
        shapes["W1_shard"] = (d / P, four_d)
        shapes["Y_partial"] = (B, S, four_d)
        shapes["Y"] = (B, S, four_d)
        shapes["Y_shard"] = (B, S, four_d / P)
        shapes["W2"] = (four_d, d)
        shapes["W2_shard"] = (four_d / P, d)
        shapes["Z_partial"] = (B, S, d)
    else:  # col-col
        shapes["W1_shard"] = (d, four_d / P)
        shapes["Y_shard"] = (B, S, four_d / P)
        shapes["Y"] = (B, S, four_d)
        shapes["W2"] = (four_d, d)
        shapes["W2_shard"] = (four_d, d / P)
        shapes["Z_shard"] = (B, S, d / P)
    shapes["Z"] = (B, S, d)
    return shapes


@dataclass(frozen=True)
class Collective:
    """One collective of a tensor-parallel layer.

    ``layer``: ``"linear1"`` or ``"linear2"``; ``phase``: ``"forward"`` or ``"backward"``;
    ``op``: ``"all_reduce"``, ``"all_gather"`` or ``"reduce_scatter"``; ``tensor``: the logical
    tensor it produces (``"Y"``, ``"Z"``, ``"dL/dX"``, ``"dL/dY"``); ``elements``: the number of
    elements of that FULL logical tensor (per-rank traffic: :func:`collective_traffic`)."""

    layer: str
    phase: str
    op: str
    tensor: str
    elements: object


def ffn_collectives(variant: str = "col-row", output_gathered: bool = True) -> list[Collective]:
    """The collectives one training step of the FFN needs, forward then backward, in order.

    Each comes from a place where the data one rank has is not the data the next operation
    needs, and its backward is the *conjugate* collective (identity <-> all-reduce,
    slice <-> all-gather):

    * ``col-row``: forward, Linear2's partial sums of Z are all-reduced (Megatron's ``g``);
      backward, every rank's Linear1 computed a partial dL/dX from its columns, so dL/dX is
      all-reduced (Megatron's ``f``, the identity in the forward).  Two all-reduces of
      B*S*d elements per step, nothing of size 4d.
    * ``row-row``: forward, Linear1's partial sums must be all-reduced *before* GeLU
      (B*S*4d), then Z's (B*S*d).  Backward: the free slice of Y in front of Linear2 becomes
      an all-gather of dL/dY (B*S*4d); the all-reduces become identities; the free slice
      of X becomes an all-gather of dL/dX (B*S*d).
    * ``col-col``: forward, Y is all-gathered for Linear2 (B*S*4d), and Z as well if
      ``output_gathered`` (B*S*d; otherwise the next layer gets the column shard).
      Backward: the gathers become free slices; Linear2's input is replicated, so each
      rank's dL/dY is a partial sum: all-reduce (B*S*4d) -- a reduce-scatter would do,
      since only this rank's slice of it is used, halving that traffic; Linear1's dL/dX is
      all-reduced as in col-row."""
    check_variant(variant)
    full_x = B * S * d
    full_y = B * S * 4 * d
    if variant == "col-row":
        return [Collective("linear2", "forward", "all_reduce", "Z", full_x),
                Collective("linear1", "backward", "all_reduce", "dL/dX", full_x)]
    if variant == "row-row":
        return [Collective("linear1", "forward", "all_reduce", "Y", full_y),
                Collective("linear2", "forward", "all_reduce", "Z", full_x),
                Collective("linear2", "backward", "all_gather", "dL/dY", full_y),
                Collective("linear1", "backward", "all_gather", "dL/dX", full_x)]
    records = [Collective("linear2", "forward", "all_gather", "Y", full_y)]  # col-col
    if output_gathered:
        records.append(Collective("linear2", "forward", "all_gather", "Z", full_x))
    records += [Collective("linear2", "backward", "all_reduce", "dL/dY", full_y),
                Collective("linear1", "backward", "all_reduce", "dL/dX", full_x)]
    return records


def collective_traffic(op: str, elements=None, degree=P):
    """Elements one rank sends (and receives) in a ring implementation of ``op`` on a tensor
    of ``elements`` elements (the full logical tensor) over ``degree`` ranks.

    A ring all-gather passes ``P-1`` chunks of ``N/P`` around: ``(P-1)/P * N``; a
    reduce-scatter likewise; an all-reduce is a reduce-scatter followed by an all-gather:
    ``2(P-1)/P * N``.  Multiply by ``e`` (bytes per element) for bytes.

    The course's one definition of ring traffic: :mod:`paralab.comm` prices every
    collective it records with it (``CollectiveRecord.traffic_bytes``)."""
    n = sp.sympify(elements if elements is not None else sp.Symbol("N", positive=True))
    degree = sp.sympify(degree)
    per_step = (degree - 1) / degree * n
    if op == "all_reduce":
        return 2 * per_step
    if op in ("all_gather", "reduce_scatter"):
        return per_step
    raise ValueError(f"unknown collective {op!r}; choose from all_reduce, all_gather, "
                     f"reduce_scatter")


def ffn_traffic(variant: str = "col-row", output_gathered: bool = True, phase: str | None = None):
    """Per-rank elements sent for one step of the FFN (or one ``phase``), summed over
    :func:`ffn_collectives`."""
    return sp.factor(sum((collective_traffic(c.op, c.elements)
                          for c in ffn_collectives(variant, output_gathered)
                          if phase is None or c.phase == phase), sp.Integer(0)))


# -- hybrid parallelism: what each dimension of a (dp, pp, tp) mesh sends per step --------------
# Degrees of data, pipeline and tensor parallelism, named like the dimensions of the device
# mesh (paralab.mesh).  pp is lecture 02's p, tp lecture 01's P; L is paralab.memory's L.
dp, pp, tp = sp.symbols("dp pp tp", positive=True, integer=True)
L = sp.Symbol("L", positive=True)
SYMBOLS.update({symbol.name: symbol for symbol in (dp, pp, tp, L)})

#: Stage positions for the traffic formulas: a pipeline's first stage receives no gradient
#: to send back and its last stage no activation to pass on (``only``: both, pp = 1).
STAGES = ("first", "middle", "last", "only")


def _ends(stage: str) -> tuple[bool, bool]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    return stage in ("first", "only"), stage in ("last", "only")


def dp_traffic(parameters, degree=dp):
    """Bytes one rank sends per step to average its gradients over its data-parallel group:
    a ring all-reduce of ``parameters`` gradients of ``e`` bytes, ``2(dp-1)/dp`` times their
    size (a reduce-scatter then an all-gather, :func:`collective_traffic`).  ``parameters``
    is what *this rank* holds: its stage's layers, its tensor-parallel shard of them."""
    return collective_traffic("all_reduce", parameters * e, degree)


def pp_traffic(elements, stage: str = "middle"):
    """Bytes one rank sends point to point per step: for each of the ``m`` microbatches, the
    activation it passes to the next stage (unless it is the last) and the gradient it
    passes back to the previous one (unless it is the first), ``elements`` each.  A point-
    to-point message crosses one link once: no ring factor.  Every tensor-parallel rank of
    a stage sends its own copy (Megatron-LM's scatter/gather optimisation, Narayanan et al.
    2021 §4.1, sends 1/tp of it and all-gathers on the other side instead)."""
    first, last = _ends(stage)
    messages = (0 if last else 1) + (0 if first else 1)
    return m * messages * elements * e


def tp_traffic(elements, all_reduces):
    """Bytes one rank sends per step in its tensor-parallel all-reduces: ``all_reduces`` of
    them (in the whole step), each of a tensor of ``elements`` elements, ring-priced."""
    return all_reduces * collective_traffic("all_reduce", elements * e, tp)


def ffn_stack_parameters():
    """Parameters one rank holds in the model of :mod:`paralab.hybrid`: ``L`` blocks of
    lecture 01's FFN (``Linear(d, 4d) -> GeLU -> Linear(4d, d)``), ``L/pp`` per stage, each
    column -> row over ``tp`` ranks.  Per block: ``W1`` (``4d^2``), ``b1`` (``4d``) and ``W2``
    (``4d^2``) are split by ``tp``; ``b2`` (``d``) is added after the all-reduce and stays
    whole on every rank: ``(L/pp)((8d^2 + 4d)/tp + d)``."""
    return L / pp * ((8 * d ** 2 + 4 * d) / tp + d)


def ffn_stack_traffic(stage: str = "last") -> dict:
    """Bytes one rank of the FFN stack of :mod:`paralab.hybrid` sends per training step, per
    mesh dimension, for a global batch of ``B`` rows of width ``d`` (each pipeline gets
    ``B/dp`` rows, in ``m`` microbatches of ``B/(dp m)``):

    * ``tp``: every block all-reduces its output in the forward (Megatron's g) and the
      gradient of its input in the backward (f) -- except the first block of the first
      stage, whose input is the data: nobody needs its gradient, so f's backward never
      runs.  ``2L/pp`` all-reduces per microbatch (one fewer on the first stage), each of
      ``B/(dp m) x d`` elements: the total does not depend on ``m``;
    * ``pp``: :func:`pp_traffic` of the same tensors;
    * ``dp``: :func:`dp_traffic` of :func:`ffn_stack_parameters`.

    The tests measure all three on 8 real processes and find these numbers exactly."""
    first, _ = _ends(stage)
    rows = B / (dp * m)
    all_reduces = m * (2 * L / pp - (1 if first else 0))
    return {"tp": sp.factor(tp_traffic(rows * d, all_reduces)),
            "pp": sp.factor(pp_traffic(rows * d, stage)),
            "dp": sp.factor(dp_traffic(ffn_stack_parameters()))}
