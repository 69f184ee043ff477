# The course's nbgrader settings live in autograder/nbgrader_config.py.
load_subconfig("autograder/nbgrader_config.py")  # noqa: F821 - provided by traitlets
