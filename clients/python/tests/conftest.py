"""Fixtures: the real nox binary ($NOX_BIN, else `nox` on PATH) with a
private state directory per test, and a small blank disk image (no test
here boots it; see test_live.py for the one real boot)."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import noxvm  # noqa: E402


@pytest.fixture(scope="session")
def nox_bin() -> str:
    b = os.environ.get("NOX_BIN") or shutil.which("nox")
    if not b:
        pytest.skip("no nox binary: set NOX_BIN")
    return b


@pytest.fixture
def home():
    # Short: nox's unix socket paths must stay under 108 bytes.
    d = tempfile.mkdtemp(prefix="noxpy-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nox(nox_bin, home):
    """A client on a private state directory; VMs left in it are deleted."""
    env = dict(os.environ)
    env["HOME"] = str(home / "home")
    # A developer's NOX_HOST would send every command elsewhere.
    env.pop("NOX_HOST", None)
    env.pop("NOX_REMOTE_BIN", None)
    n = noxvm.Nox(nox_bin, home=home, env=env)
    yield n
    for vm in (home / "vms").glob("[!.]*"):
        try:
            n.delete(vm.name, force=True)
        except noxvm.NoxError:
            pass


@pytest.fixture(scope="session")
def blank_image():
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    d = tempfile.mkdtemp(prefix="noxpy-img-", dir="/tmp")
    p = Path(d, "blank.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "1G"], check=True)
    yield p
    shutil.rmtree(d, ignore_errors=True)
