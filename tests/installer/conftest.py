"""Session fixtures: the test wheels, a private index with basic auth, an "image" Python."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import PypiServer, base_env, make_wheel  # noqa: E402

# Credentials with every special character the spec names. HTTP basic auth cannot carry a
# ":" in the user name (RFC 7617), so only the password has it.
USER = "kaspr user@/#?%&;$x"
PASSWORD = "p@ss: /#?%&;$ word'\"`\\~!^*()[]{}<>|=+,"
PLAIN_USER = "alice"
PLAIN_PASSWORD = "correct-horse"


@pytest.fixture(scope="session")
def wheels(tmp_path_factory):
    """name -> list of wheel paths; also the directory pypiserver serves."""
    root = tmp_path_factory.mktemp("wheels")
    built = {
        "kasprdemo": [make_wheel(root, "kasprdemo", "1.0"), make_wheel(root, "kasprdemo", "2.0")],
        "basedep": [make_wheel(root, "basedep", "1.0"), make_wheel(root, "basedep", "2.0")],
        "needsbase": [make_wheel(root, "needsbase", "1.0", requires=["basedep>=1.0"])],
        "needsbase2": [make_wheel(root, "needsbase2", "1.0", requires=["basedep==2.0"])],
        "kasprextra": [make_wheel(root, "kasprextra", "1.0", extras=["feat"],
                                  requires=['kasprdemo==2.0; extra == "feat"'])],
    }
    return root, built


@pytest.fixture(scope="session")
def pypi(wheels, tmp_path_factory):
    """pypiserver on 127.0.0.1 with two users; every action requires basic auth."""
    from passlib.apache import HtpasswdFile

    root, _ = wheels
    work = tmp_path_factory.mktemp("pypi")
    htpasswd = work / "htpasswd"
    ht = HtpasswdFile(str(htpasswd), new=True)
    ht.set_password(USER, PASSWORD)
    ht.set_password(PLAIN_USER, PLAIN_PASSWORD)
    ht.save()
    server = PypiServer(root, htpasswd, work / "pypiserver.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def image_python(tmp_path_factory, pypi):
    """A venv standing in for the app image: its own pip, and basedep 1.0 preinstalled."""
    venv = tmp_path_factory.mktemp("image") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    env = dict(base_env(venv.parent))
    env["PIP_INDEX_URL"] = "http://%s:%s@127.0.0.1:%d/simple/" % (PLAIN_USER, PLAIN_PASSWORD, pypi.port)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-cache-dir", "basedep==1.0"],
                   check=True, env=env, timeout=120)
    return python


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return base_env(home)


@pytest.fixture
def target(tmp_path):
    return tmp_path / "packages"


@pytest.fixture
def termlog(tmp_path):
    return tmp_path / "termination-log"


def with_creds(env, user=PLAIN_USER, password=PLAIN_PASSWORD):
    env = dict(env)
    env["KASPR_PYPI_USERNAME"] = user
    env["KASPR_PYPI_PASSWORD"] = password
    return env
