"""The client against the real nox binary, without booting anything
(`start=False` is `nox create --no-start`)."""

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

import noxvm


def test_create_info_list_delete(nox, blank_image):
    vm = nox.create("py-one", image=str(blank_image), cpus=1, memory="256M", disk="2G",
                    network="user", start=False)
    assert isinstance(vm, noxvm.Vm)
    assert (vm.name, vm.state, vm.cpus) == ("py-one", "stopped", 1)
    assert vm.memory == 256 << 20 and vm.disk == 2 << 30
    assert vm.network == "user" and vm.image == str(blank_image)
    # Not running: no address or port yet; the user and key are known.
    assert vm.ip is None and vm.ssh_port is None and vm.ssh_host is None
    assert vm.ssh_user == "nox" and vm.ssh_key.endswith("/vms/py-one/id_ed25519")
    assert vm.raw["name"] == "py-one"
    assert not vm.running
    assert nox.info("py-one") == vm
    # Sizes in bytes, a generated name.
    other = nox.create(image=str(blank_image), memory=512 << 20, disk=1 << 30, network="user",
                       start=False)
    assert other.name.startswith("nox-") and other.memory == 512 << 20
    assert sorted(v.name for v in nox.list()) == sorted(["py-one", other.name])
    nox.delete("py-one")
    nox.delete(other.name)
    assert nox.list() == []


def test_errors_carry_noxs_message_and_exit_code(nox, blank_image):
    with pytest.raises(noxvm.NoxError) as e:
        nox.info("missing")
    assert e.value.returncode == 1
    assert e.value.message == 'no VM named "missing" (see `nox list`)'
    assert "error:" in e.value.stderr and e.value.argv[1:] == ["info", "missing", "--json"]
    with pytest.raises(noxvm.NoxError) as e:
        nox.create("Bad_Name", image=str(blank_image), start=False)
    assert "invalid VM name" in str(e.value) and e.value.returncode != 0
    nox.create("dup", image=str(blank_image), network="user", start=False)
    with pytest.raises(noxvm.NoxError, match="already exists"):
        nox.create("dup", image=str(blank_image), network="user", start=False)
    with pytest.raises(noxvm.NoxError, match="--memory"):
        nox.create("small", image=str(blank_image), memory="1M", start=False)
    # Nothing half-made by the refused creates.
    assert [v.name for v in nox.list()] == ["dup"]
    with pytest.raises(noxvm.NoxError, match="invalid --since"):
        list(nox.events(since="yesterday", follow=False))
    with pytest.raises(noxvm.NoxError, match="no VM named"):
        list(nox.events("nosuchvm", follow=False))


def test_a_missing_binary_is_a_nox_error(home):
    n = noxvm.Nox(home / "no-such-nox", home=home)
    with pytest.raises(noxvm.NoxError) as e:
        n.list()
    assert e.value.returncode is None and "cannot run" in e.value.message
    with pytest.raises(noxvm.NoxError):
        next(n.events())


def test_host_is_passed_before_the_command(nox_bin, home):
    n = noxvm.Nox(nox_bin, home=home, host="ssh://ops@[::1]:2222")
    assert n._argv(["list", "--json"]) == [nox_bin, "--host=ssh://ops@[::1]:2222", "list", "--json"]
    assert noxvm.Nox(nox_bin, host="")._argv(["list"]) == [nox_bin, "--host=", "list"]
    assert noxvm.Nox(nox_bin)._argv(["list"]) == [nox_bin, "list"]
    # Nothing listens on port 1: nox's own error, ssh's exit code.
    n = noxvm.Nox(nox_bin, home=home, host="ssh://127.0.0.1:1")
    with pytest.raises(noxvm.NoxError) as e:
        n.list()
    assert e.value.returncode == 255
    assert e.value.message.startswith("cannot reach ssh://127.0.0.1:1 over ssh"), e.value.message
    with pytest.raises(noxvm.NoxError) as e:
        noxvm.Nox(nox_bin, home=home, host="http://x").list()
    assert e.value.returncode == 2 and "unsupported scheme" in e.value.message


def test_events_history_and_follow(nox, blank_image):
    t0 = datetime.now(timezone.utc) - timedelta(seconds=1)
    nox.create("ev-a", image=str(blank_image), network="user", start=False)
    nox.delete("ev-a")
    seen = [(e.vm, e.type) for e in nox.events(follow=False)]
    assert seen == [("ev-a", "created"), ("ev-a", "deleted")]
    ev = next(iter(nox.events("ev-a", follow=False)))
    assert ev.version == noxvm.EVENTS_VERSION and ev.fields["network"] == "user"
    assert ev.time.tzinfo is not None and ev.time >= t0

    # A follower sees what happens after it started; closing it stops nox.
    follower = nox.events(since=datetime.now(timezone.utc))
    got = []

    def read():
        for e in follower:
            got.append(e)
            if len(got) == 2:
                break

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.5)
    nox.create("ev-b", image=str(blank_image), network="user", start=False)
    nox.delete("ev-b")
    t.join(timeout=30)
    assert not t.is_alive(), "the follower saw no events"
    follower.close()
    assert [(e.vm, e.type) for e in got] == [("ev-b", "created"), ("ev-b", "deleted")]
    # Since a time: the recent past only.
    recent = [e.vm for e in nox.events(since=got[0].time, follow=False)]
    assert recent == ["ev-b", "ev-b"]


def test_module_functions_use_nox_bin_and_nox_home(nox_bin, home, blank_image, monkeypatch):
    monkeypatch.setenv("NOX_BIN", nox_bin)
    monkeypatch.setenv("NOX_HOME", str(home))
    monkeypatch.setenv("HOME", str(home / "home"))
    monkeypatch.setattr(noxvm, "_default", None)
    vm = noxvm.create("mod-fn", image=str(blank_image), network="user", start=False)
    assert noxvm.info("mod-fn") == vm
    assert [v.name for v in noxvm.list()] == ["mod-fn"]
    noxvm.delete("mod-fn")
    assert [e.type for e in noxvm.events("mod-fn", follow=False)] == ["created", "deleted"]
