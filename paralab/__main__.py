"""``python -m paralab ...``: see :mod:`paralab.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
