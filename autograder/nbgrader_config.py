# nbgrader settings of the course.  Loaded by the repository's nbgrader_config.py (so the
# plain `nbgrader` command works from the repository root) and by `python -m autograder`,
# which adds the paths of its working course directory and the limits given on its command
# line.  This is an nbgrader config file, not a module to import.
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor, ClearMetadataPreprocessor
from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, ClearHiddenTests,
                                    GetGrades, IgnorePattern, LimitOutput, SaveAutoGrades)

from autograder.preprocessors import FeedbackCleanup, SandboxedExecute, ShieldMarkers

c = get_config()  # noqa: F821 - provided by traitlets when it loads this file

# solutions/<assignment>/ holds the instructors' sources (generated from the text sources
# <notebook>.pct.py, which must never reach a release); assignments/ is the student release.
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "assignments"
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback",
                            "*.pct.py", ".*"]

# Notebooks run in the sandbox (autograder/sandbox.py), with the limits of
# autograder/limits.py: set any of them by name, e.g.
#     c.SandboxedExecute.limits = {"cell_timeout": 60, "notebook_timeout": 600}
# (`python -m autograder grade` takes them from its command line instead).
c.SandboxedExecute.limits = {}
c.SandboxedExecute.sandbox = "auto"

# Test cells a student deleted are put back (and run) instead of needing manual grading.
c.OverwriteCells.add_missing_cells = True

# Notebooks run in the sandbox, not in a kernel of the grading process.
c.Autograde.autograde_preprocessors = [
    SandboxedExecute,
    IgnorePattern,
    ClearMetadataPreprocessor,
    LimitOutput,
    SaveAutoGrades,
    AssignLatePenalties,
    CheckCellMetadata,
]
c.LimitOutput.max_lines = 500
c.LimitOutput.max_traceback = 60

# Feedback: hidden tests removed, and test cells reduced to the final error message (the
# feedback that names the misconception), without traceback frames that quote test code.
# HTML and JavaScript that a student's code displays must not run in the browser of whoever
# opens the feedback (the instructor included).
c.HTMLExporter.sanitize_html = True
c.GenerateFeedback.preprocessors = [
    GetGrades,
    ShieldMarkers,
    ClearHiddenTests,
    FeedbackCleanup,
    CSSHTMLHeaderPreprocessor,
]
