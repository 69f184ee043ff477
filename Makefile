# The course's commands.  Everything runs from a local virtual environment (.venv) that
# `make` creates and fills on first use, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?= --durations=25
# Test files run on two workers (a file's tests stay together: they share its worlds and
# fixtures), the heavy ones first (tests/conftest.py).  TEST_JOBS=0 runs everything in one process.
TEST_JOBS ?= 2
XDIST := $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder)

.PHONY: test test-fast lint soak venv instructor book book-solutions grade-sample clean

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
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# 200 consecutive 4-rank worlds next to a CPU-burning process: transient join failures must
# stay invisible.  `make test` starts 8 of them; CI runs this after the tests.
soak: $(STAMP)
	PARALAB_SOAK_WORLDS=200 $(PY) -m pytest -q tests/test_launch.py -k cpu_burning_neighbour

# ruff, configured in pyproject.toml; CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The README's main command: grade the bundled sample class, print the scores and say
# where the feedback is.  Safe to run again (the same folder is regraded in place).
SAMPLE_OUT ?= _build/sample-grading
grade-sample: $(STAMP)
	$(PY) -m autograder grade autograder/samples/class --out $(SAMPLE_OUT) --cell-timeout 30
	@$(PY) -m autograder.samples report $(SAMPLE_OUT)

# The reader's book (Sphinx, configured in course/conf.py): the lectures executed, the
# homework problem statements, glossary, misconceptions, API reference, references.  Opens as
# _build/book/index.html.  A cell error or a Sphinx warning fails the build; executed pages
# are cached (_build/.jupyter_cache), so a second build only re-runs what changed.
SPHINX := $(PY) -m sphinx -W --keep-going -q -j 1
# After a failed build the saved environment is dropped: otherwise the next build would
# skip the pages that warned and succeed.
book: $(STAMP)
	$(SPHINX) -b html -d _build/.doctrees/book course _build/book \
	  || { rm -rf _build/.doctrees/book; exit 1; }
	@echo "book: _build/book/index.html"

# The same book with worked solutions, for self-study; instructors publish the default one.
book-solutions: $(STAMP)
	$(SPHINX) -t solutions -b html -d _build/.doctrees/book-solutions course _build/book-solutions \
	  || { rm -rf _build/.doctrees/book-solutions; exit 1; }
	@echo "book with solutions: _build/book-solutions/index.html"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info _build
