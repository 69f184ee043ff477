"""``python -m paralab.launch``: see :mod:`paralab.launch.cli`."""

import sys

# Guarded: the forkserver's workers import the main module under another name.
if __name__ == "__main__":
    from paralab.launch.cli import main

    sys.exit(main())
