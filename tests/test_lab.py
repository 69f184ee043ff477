"""JupyterLab as students and instructors find it (``python -m autograder.lab ROLE``).

A real Lab server is started on the settings written for each role, and asked what a
browser would be told: the default viewer of ``.md`` files, the nbgrader plugins that are
off, the nbgrader server extensions that answer.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from autograder import lab

pytestmark = pytest.mark.slow
TOKEN = "paralab-test-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"token {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


@pytest.fixture(params=["student", "instructor"])
def server(request, tmp_path):
    """A Lab server whose configuration is only what ``configure`` wrote (plus the
    environment's installed extensions)."""
    prefix = tmp_path / "prefix"
    where = lab.configure(request.param, prefix=str(prefix))
    config = os.path.dirname(os.path.dirname(where["server"]))  # .../etc/jupyter
    port = free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "user-config"),
               JUPYTER_CONFIG_PATH=config, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"), HOME=str(tmp_path))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
           f"--port={port}", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}",
           f"--LabApp.app_settings_dir={os.path.dirname(where['overrides'])}",
           f"--ServerApp.root_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if get(port, "/api/status")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read().decode()[-2000:])
            time.sleep(0.5)
        else:
            pytest.fail("the Lab server did not start in 90 s")
        yield request.param, port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_lab_tells_the_browser_what_each_role_gets(server):
    role, port = server
    status, body = get(port, "/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
    assert status == 200
    settings = json.loads(body)
    viewers = settings["schema"]["properties"]["defaultViewers"]["default"]
    assert viewers["markdown"] == lab.JUPYTEXT_VIEWER == "Jupytext Notebook"
    status, page = get(port, "/lab")
    assert status == 200
    data = json.loads(re.search(r'<script id="jupyter-config-data" type="application/json">'
                                r'(.*?)</script>', page, re.DOTALL).group(1))
    disabled = set(data.get("disabledExtensions", []))
    nbgrader = {f"@jupyter/nbgrader:{p}" for p in lab.NBGRADER_PLUGINS}
    if role == "student":
        assert disabled & nbgrader == nbgrader - {"@jupyter/nbgrader:validate-assignment"}
        assert get(port, "/formgrader")[0] == 404
    else:
        assert not disabled & nbgrader
        assert get(port, "/formgrader")[0] in (200, 302)


def test_configure_keeps_other_settings_and_refuses_unknown_roles(tmp_path):
    where = lab.paths(str(tmp_path))
    os.makedirs(os.path.dirname(where["page_config"]))
    with open(where["page_config"], "w") as f:
        json.dump({"disabledExtensions": {"some-other:plugin": True}}, f)
    lab.configure("student", prefix=str(tmp_path))
    lab.configure("instructor", prefix=str(tmp_path))
    with open(where["page_config"]) as f:
        disabled = json.load(f)["disabledExtensions"]
    assert disabled.pop("some-other:plugin") is True and not any(disabled.values())
    with pytest.raises(ValueError, match="role must be one of"):
        lab.configure("teacher", prefix=str(tmp_path))
