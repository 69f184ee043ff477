"""The three ways the course splits the Transformer FFN over P ranks, by name.

``col-row`` is Megatron-LM's layout (column-parallel Linear1, row-parallel Linear2); the
other two are the ones students propose and the lectures take apart.  The layers
(:mod:`paralab.tp`), the formulas (:mod:`paralab.formulas`) and the command line all take
the names from here, so that there is one list to extend.  This module imports neither
torch nor SymPy: each of those users can import it for free.
"""

from __future__ import annotations

#: variant name -> how (Linear1, Linear2) are split: "column" or "row".
LAYOUTS: dict[str, tuple[str, str]] = {
    "col-row": ("column", "row"),
    "row-row": ("row", "row"),
    "col-col": ("column", "column"),
}

FFN_VARIANTS: tuple[str, ...] = tuple(LAYOUTS)


def check_variant(variant: str) -> tuple[str, str]:
    """The (Linear1, Linear2) split of ``variant``; a ValueError naming the choices if unknown."""
    try:
        return LAYOUTS[variant]
    except (KeyError, TypeError):
        raise ValueError(f"unknown FFN variant {variant!r}; choose from "
                         f"{', '.join(FFN_VARIANTS)}") from None
