"""One module per assignment: its mutant submissions and its students of the sample class.

Each module defines ``ASSIGNMENT``, ``MUTANTS`` (a list of :class:`autograder.samples.Mutant`)
and ``samples(root) -> list[autograder.samples.Work]``.  :mod:`autograder.samples` finds them
by name.
"""
