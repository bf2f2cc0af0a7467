"""One real guest, driven the way Polaris drives it: the VMManager example
creates it (nox create --wait) and the client checks what it returns, SSH
into it and its readiness events. Run by nox's tests/events.rs, which boots
nothing else and goes on with the same VM (stop, delete, the event
sequence); skipped unless NOX_TEST_LIVE_IMAGE is set. The VM is left
running for that test (NOX_HOME is the test's)."""

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import noxvm  # noqa: E402
from polaris_vmmanager import VMManager  # noqa: E402

IMAGE = os.environ.get("NOX_TEST_LIVE_IMAGE")


@pytest.mark.skipif(not IMAGE, reason="NOX_TEST_LIVE_IMAGE not set (tests/events.rs sets it)")
def test_polaris_create_vm_on_a_real_guest(nox_bin):
    name = os.environ.get("NOX_TEST_LIVE_NAME", "py-live")
    nox = noxvm.Nox(nox_bin)  # NOX_HOME and HOME from the environment
    m = VMManager(base=IMAGE, cpus=2, memory="1G", disk="4G", network="user", nox=nox,
                  timeout=900, accel="tcg")
    made = m.create_vm(name)
    assert made is not None, "create_vm failed (see the log above)"
    assert made["vm_id"] == name
    # User-mode networking: SSH through the port nox forwards on 127.0.0.1.
    assert made["ip_address"] == "127.0.0.1"
    assert isinstance(made["ssh_port"], int) and made["ssh_port"] > 0
    assert made["ssh_user"] == "nox" and Path(made["ssh_key"]).is_file()
    vm = nox.info(name)
    assert vm.running and vm.ssh_port == made["ssh_port"]
    assert nox.ssh(name, "hostname").stdout.strip() == name
    assert name in [v.name for v in nox.list()]
    # The supervisor's own readiness watch reports the same.
    deadline = time.time() + 300
    while True:
        types = [e.type for e in nox.events(name, follow=False)]
        if "cloud-init" in types or time.time() > deadline:
            break
        time.sleep(1)
    evs = [e for e in nox.events(name, follow=False)]
    ready = [e for e in evs if e.type == "ssh-ready"]
    assert ready and ready[0].fields == {"host": "127.0.0.1", "port": made["ssh_port"]}
    done = [e for e in evs if e.type == "cloud-init"]
    assert done and done[0].fields["status"] == "done", done
