"""JupyterLab as each audience should find it: ``python -m autograder.lab student|instructor``.

nbgrader installs its instructor tools everywhere it is installed: the Nbgrader menu, the
"Create Assignment" sidebar, the formgrader, the course and assignment lists (the latter two
are for nbgrader's exchange, which this course does not use).  A student needs none of them,
only the Validate button of a notebook, and the course's lectures (MyST ``.md`` notebooks)
should open as notebooks when double-clicked, not as text.

This writes the settings into the environment that runs JupyterLab (``sys.prefix``), so it
affects that environment only:

* ``share/jupyter/lab/settings/overrides.json``: jupytext's notebook viewer is the default
  for Markdown and MyST files (JupyterLab's own setting
  ``@jupyterlab/docmanager-extension:plugin`` -> ``defaultViewers``);
* ``etc/jupyter/labconfig/page_config.json``: the nbgrader front-end plugins that are off
  (``disabledExtensions``);
* ``etc/jupyter/jupyter_server_config.d/nbgrader.json``: the nbgrader server extensions
  that run.

``make venv`` sets up a student's Lab; ``make instructor`` the full set.
"""

from __future__ import annotations

import json
import os
import sys

DOCMANAGER = "@jupyterlab/docmanager-extension:plugin"
JUPYTEXT_VIEWER = "Jupytext Notebook"

NBGRADER_PLUGINS = ("menu", "create-assignment", "formgrader", "course-list",
                    "assignment-list", "validate-assignment")
NBGRADER_SERVER = ("formgrader", "course_list", "assignment_list", "validate_assignment")

ROLES = {
    # what each role keeps of nbgrader (front end, server); everything else is turned off
    "student": ({"validate-assignment"}, {"validate_assignment"}),
    "instructor": (set(NBGRADER_PLUGINS), set(NBGRADER_SERVER)),
}


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def paths(prefix: str = sys.prefix) -> dict[str, str]:
    return {
        "overrides": os.path.join(prefix, "share", "jupyter", "lab", "settings",
                                  "overrides.json"),
        "page_config": os.path.join(prefix, "etc", "jupyter", "labconfig", "page_config.json"),
        "server": os.path.join(prefix, "etc", "jupyter", "jupyter_server_config.d",
                               "nbgrader.json"),
    }


def configure(role: str, prefix: str = sys.prefix) -> dict[str, str]:
    """Write the settings of ``role`` into the environment at ``prefix``; returns the files
    written.  Other settings in those files are kept."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    plugins_on, server_on = ROLES[role]
    where = paths(prefix)

    overrides = _read(where["overrides"])
    viewers = overrides.setdefault(DOCMANAGER, {}).setdefault("defaultViewers", {})
    viewers.update({"markdown": JUPYTEXT_VIEWER, "myst": JUPYTEXT_VIEWER})
    _write(where["overrides"], overrides)

    page = _read(where["page_config"])
    disabled = page.get("disabledExtensions", {})
    if isinstance(disabled, list):  # the older list form
        disabled = {name: True for name in disabled}
    for plugin in NBGRADER_PLUGINS:
        # an explicit False (not a missing key) also overrides a True of a configuration
        # folder of lower priority
        disabled[f"@jupyter/nbgrader:{plugin}"] = plugin not in plugins_on
    page["disabledExtensions"] = disabled
    _write(where["page_config"], page)

    server = _read(where["server"])
    enabled = server.setdefault("ServerApp", {}).setdefault("jpserver_extensions", {})
    for ext in NBGRADER_SERVER:
        enabled[f"nbgrader.server_extensions.{ext}"] = ext in server_on
    _write(where["server"], server)
    return where


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ROLES:
        print(f"usage: python -m autograder.lab {'|'.join(ROLES)}", file=sys.stderr)
        return 2
    configure(argv[0])
    kept = ", ".join(sorted(ROLES[argv[0]][0]))
    print(f"JupyterLab set up for {argv[0]}s: .md lectures open as notebooks; nbgrader "
          f"tools: {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
