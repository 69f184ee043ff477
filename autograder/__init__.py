"""The course's autograder: nbgrader driven in-process, submissions run in a sandbox, and
every autograded test re-checked in a clean process.

Kept import-free on purpose: ``autograder.checks`` is imported by students' notebooks
(inside the sandbox, where only this file and ``checks/`` are visible).  The grading
engine lives in the submodules; see ``autograder/README.md``.
"""
