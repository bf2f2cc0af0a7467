"""The Polaris VMManager example on the real nox, without booting (its
successful create_vm is checked by test_live.py on a real guest)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from polaris_vmmanager import VMManager, main  # noqa: E402


def test_failed_create_returns_none_and_leaves_nothing(nox, home):
    m = VMManager(base=str(home / "no-such.qcow2"), nox=nox, network="user", memory="256M", disk="1G")
    assert m.create_vm() is None
    assert m.create_vm("polaris-x", base="no-such-catalog-image") is None
    assert nox.list() == []


def test_an_existing_vm_is_not_deleted_by_a_failed_create(nox, blank_image):
    nox.create("polaris-taken", image=str(blank_image), network="user", start=False)
    m = VMManager(base=str(blank_image), nox=nox, network="user")
    assert m.create_vm("polaris-taken") is None
    assert [v["vm_id"] for v in m.list_vms()] == ["polaris-taken"]


def test_delete_and_list(nox, blank_image):
    nox.create("polaris-a", image=str(blank_image), network="user", start=False)
    nox.create("polaris-b", image=str(blank_image), network="user", start=False)
    m = VMManager(nox=nox)
    vms = m.list_vms()
    assert [v["vm_id"] for v in vms] == ["polaris-a", "polaris-b"]
    assert vms[0]["state"] == "stopped" and vms[0]["ssh_port"] is None
    assert m.delete_vm("polaris-a") is True
    assert m.delete_vm("polaris-a") is False
    assert [v["vm_id"] for v in m.list_vms()] == ["polaris-b"]


def test_command_line(nox, blank_image, monkeypatch, capsys):
    for k, v in nox.env.items():
        monkeypatch.setenv(k, v)
    nox.create("polaris-cli", image=str(blank_image), network="user", start=False)
    assert main(["--nox", nox.binary, "list"]) == 0
    assert '"vm_id": "polaris-cli"' in capsys.readouterr().out
    assert main(["--nox", nox.binary, "delete", "polaris-cli"]) == 0
    assert main(["--nox", nox.binary, "delete", "polaris-cli"]) == 1
