"""Polaris's VMManager (libvirt-python) rewritten on nox.

The original clones a libvirt domain's XML, makes a qcow2 overlay by hand,
defines and starts the domain, then polls libvirt's DHCP leases for up to
120 s and returns ``{"vm_id", "ip_address", "ssh_port": 22}`` (or None).
On nox the same is one call: ``nox create --wait`` makes the overlay and
the cloud-init seed, starts the VM and returns once SSH accepts the VM's key
and cloud-init is done, so the returned address is one you can log in to.

Differences worth knowing:
- ``base`` is a nox image: a catalog name (``debian-13``, ``ubuntu-24.04``),
  an imported image's name, or a local qcow2 path. No template domain to
  keep, no ``virt-sysprep``: cloud-init provisions each VM.
- With a bridge (``network="bridge:br0"``) ``ip_address`` is the guest's own
  address and ``ssh_port`` 22, as before. With user-mode networking (nox's
  default without a bridge) ``ip_address`` is 127.0.0.1 and ``ssh_port``
  the port nox forwards to the guest's sshd.
- The SSH host key is pinned by nox: log in with ``nox ssh VM_ID`` or with
  ``ssh_user``/``ssh_key`` and the VM's known_hosts (``Nox.ssh``).
- A failed create leaves nothing behind (the half-started VM is deleted),
  and ``create_vm`` returns None as the original does.

Run it:  python3 polaris_vmmanager.py create 3 --image debian-13
         python3 polaris_vmmanager.py list
         python3 polaris_vmmanager.py delete polaris-dev-1a2b3c4d ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import noxvm  # noqa: E402


class VMManager:
    def __init__(
        self,
        base: str = "debian-13",
        cpus: int = 2,
        memory: str = "2G",
        disk: str = "20G",
        network: Optional[str] = None,
        nox: Optional[noxvm.Nox] = None,
        timeout: int = 900,
        **create_options: Any,
    ):
        """``base``: the image every VM starts from. ``nox``: which nox
        binary and state directory (default: ``$NOX_BIN``/``nox``, and
        nox's own default state directory). ``timeout``: seconds to wait for
        SSH and cloud-init. Other keyword arguments go to ``Nox.create``."""
        self.logger = logging.getLogger(__name__)
        self.nox = nox or noxvm.Nox()
        self.base = base
        self.cpus = cpus
        self.memory = memory
        self.disk = disk
        self.network = network
        self.timeout = timeout
        self.create_options = create_options

    def create_vm(self, name: Optional[str] = None, base: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """Creates and boots a VM from ``base`` (default: the manager's);
        returns ``{"vm_id", "ip_address", "ssh_port", "ssh_user", "ssh_key"}``
        once it accepts SSH, or None if it could not be made ready."""
        if not name:
            name = f"polaris-dev-{str(uuid.uuid4())[:8]}"
        try:
            vm = self.nox.create(
                name,
                image=base or self.base,
                cpus=self.cpus,
                memory=self.memory,
                disk=self.disk,
                network=self.network,
                wait=True,
                timeout=self.timeout,
                **self.create_options,
            )
        except noxvm.NoxError as e:
            self.logger.error("Could not create VM %s: %s (exit %s)", name, e.message, e.returncode)
            # A VM that started but never became ready is not kept; a VM
            # that already had this name is not ours to delete.
            if "already exists" not in e.message:
                self.delete_vm(name, quiet=True)
            return None
        return {
            "vm_id": vm.name,
            "ip_address": vm.ip or vm.ssh_host,
            "ssh_port": vm.ssh_port,
            "ssh_user": vm.ssh_user,
            "ssh_key": vm.ssh_key,
        }

    def create_vms(self, count: int, parallel: int = 4, base: Optional[str] = None) -> List[Dict[str, Any]]:
        """``count`` VMs, ``parallel`` at a time; the ones that failed are
        left out (and logged)."""
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            made = list(pool.map(lambda _: self.create_vm(base=base), range(count)))
        return [m for m in made if m is not None]

    def delete_vm(self, vm_id: str, quiet: bool = False) -> bool:
        """Deletes a VM (stopping it first if it runs). True when it is gone."""
        try:
            self.nox.delete(vm_id, force=True)
            return True
        except noxvm.NoxError as e:
            if not quiet:
                self.logger.error("Failed to delete VM %s: %s", vm_id, e.message)
            return False

    def list_vms(self) -> List[Dict[str, Any]]:
        """The VMs with their state and where to SSH."""
        return [
            {
                "vm_id": vm.name,
                "state": vm.state,
                "ip_address": vm.ip or vm.ssh_host,
                "ssh_port": vm.ssh_port,
            }
            for vm in self.nox.list()
        ]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nox", help="the nox binary (default: $NOX_BIN or nox on PATH)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create COUNT VMs and print their access as JSON")
    c.add_argument("count", type=int, nargs="?", default=1)
    c.add_argument("--image", default="debian-13")
    c.add_argument("--cpus", type=int, default=2)
    c.add_argument("--memory", default="2G")
    c.add_argument("--disk", default="20G")
    c.add_argument("--network")
    c.add_argument("--parallel", type=int, default=4)
    d = sub.add_parser("delete", help="delete VMs")
    d.add_argument("vm_ids", nargs="+")
    sub.add_parser("list", help="list VMs as JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    nox = noxvm.Nox(a.nox)
    if a.cmd == "create":
        m = VMManager(a.image, a.cpus, a.memory, a.disk, a.network, nox=nox)
        made = m.create_vms(a.count, a.parallel)
        print(json.dumps(made, indent=2))
        return 0 if len(made) == a.count else 1
    m = VMManager(nox=nox)
    if a.cmd == "delete":
        return 0 if all([m.delete_vm(v) for v in a.vm_ids]) else 1
    print(json.dumps(m.list_vms(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
