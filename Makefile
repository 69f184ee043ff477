# The course's commands.  Everything runs from a local virtual environment (.venv) that
# `make` creates and fills on first use, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: test test-fast venv instructor book grade-sample clean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever the dependency list changes.  JupyterLab is set up for students:
# lectures (.md) open as notebooks, and of nbgrader only the Validate button is on.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m autograder.lab student
	touch $@

# The instructors' JupyterLab: nbgrader's menu, formgrader and "Create Assignment" too.
instructor: $(STAMP)
	$(PY) -m autograder.lab instructor

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The README's main command: grade the bundled sample class, print the scores and say
# where the feedback is.  Safe to run again (the same folder is regraded in place).
SAMPLE_OUT ?= _build/sample-grading
grade-sample: $(STAMP)
	$(PY) -m autograder grade autograder/samples/class --out $(SAMPLE_OUT) --cell-timeout 30
	@$(PY) -m autograder.samples report $(SAMPLE_OUT)

# The lectures, executed and rendered to HTML in _build/book (open _build/book/index.html).
book: $(STAMP)
	$(PY) course/build.py _build/book

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info _build
