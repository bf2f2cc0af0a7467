//! Extra disks, hotplug ports and host devices on qemu's command line (and
//! the same objects as QMP takes them for hotplug). Pure.

use super::{Argv, QemuError};
use crate::model::device::Passthrough;
use crate::model::qemu_opts::Opts;

/// Free PCIe root ports, where `nox disk add` plugs a disk into the running
/// VM: a device on the root bus (q35's pcie.0, virt's) can be neither
/// hotplugged nor unplugged. So every extra disk present at the start sits
/// on a port of its own too (ports `HOTPLUG_PORTS..`), and `nox disk rm`
/// can unplug it. Eight ports share one root bus slot as functions of a
/// multifunction device, so the ports take at most 3 slots (8 free + 16
/// disks); no I/O window (virtio needs none, and the 64K of I/O space
/// would run out).
pub const HOTPLUG_PORTS: usize = 8;
/// The root bus slot of the first eight ports (0x1c..=0x1e are free on q35
/// and virt: nox sets no other address).
const HOTPLUG_SLOT: usize = 0x1c;

/// The id of hotplug port `i`.
pub fn hotplug_port(i: usize) -> String {
    format!("nox-hp{i}")
}

pub(super) fn hotplug_ports(a: &mut Argv, count: usize) {
    for i in 0..count {
        let (slot, func) = (HOTPLUG_SLOT + i / 8, i % 8);
        let mut port = Opts::new("pcie-root-port")
            .set("id", hotplug_port(i))
            .set("chassis", i + 1)
            .set("addr", format!("{slot:#x}.{func:#x}"))
            .set("io-reserve", 0);
        if func == 0 {
            port = port.set("multifunction", "on");
        }
        a.opt("-device", port);
    }
}

/// The block node of extra disk `name` on `filename` (a path, or
/// `/dev/fdset/N` for a file handed to a running qemu), as JSON: qemu's
/// `-blockdev` takes it as is, and QMP's `blockdev-add` takes the same
/// object. `backing: null`: whatever backing file the qcow2 header comes to
/// name (a compromised qemu can write its own files' headers), qemu opens
/// none.
pub fn blockdev_json(name: &crate::model::disk::DiskName, filename: &str) -> serde_json::Value {
    serde_json::json!({
        "driver": "qcow2",
        "node-name": name.node_name(),
        "discard": "unmap",
        "backing": null,
        "file": {"driver": "file", "filename": filename, "discard": "unmap"},
    })
}

pub(super) fn blockdev(name: &crate::model::disk::DiskName, filename: &str) -> String {
    blockdev_json(name, filename).to_string()
}

/// The virtio-blk device of extra disk `name`. The serial is the name: the
/// guest finds the disk as /dev/disk/by-id/virtio-NAME, whatever /dev/vdX
/// it gets.
pub(super) fn disk_device(name: &crate::model::disk::DiskName) -> Opts {
    Opts::new("virtio-blk-pci")
        .set("drive", name.node_name())
        .set("id", name.device_id())
        .set("serial", name)
}

/// [`disk_device`] as QMP's `device_add` takes it, on hotplug port `bus`.
pub fn disk_device_json(name: &crate::model::disk::DiskName, bus: &str) -> serde_json::Value {
    serde_json::json!({
        "driver": "virtio-blk-pci",
        "drive": name.node_name(),
        "id": name.device_id(),
        "serial": name.as_str(),
        "bus": bus,
    })
}

/// `-device` for each host device: VFIO PCI devices by their address (qemu
/// reads the device's `iommu_group` link under /sys/bus/pci/devices/ADDR,
/// which the jail binds read-only, and opens /dev/vfio/GROUP), USB devices
/// as `usb-host` on one xHCI controller (added with the first).
///
/// A USB device is named by its usbfs node (`hostdevice=`), not by
/// `hostbus`/`hostaddr` or `vendorid`/`productid`: those make qemu's
/// libusb enumerate the host's USB devices (sysfs, /dev/bus/usb) and keep
/// scanning for a match, and the jail shows qemu neither; with
/// `hostdevice` qemu opens exactly the one node the jail holds. nox finds
/// the node from the vendor and product id at every start.
pub(super) fn host_devices(a: &mut Argv, devices: &[Passthrough]) -> Result<(), QemuError> {
    let (mut pci, mut usb) = (0, 0);
    for d in devices {
        match d {
            Passthrough::Pci { addr, .. } => {
                let dev = Opts::new("vfio-pci")
                    .set("host", addr)
                    .set("id", format!("hostpci{pci}"));
                a.opt("-device", dev);
                pci += 1;
            }
            Passthrough::Usb { bus, dev, .. } => {
                if usb == 0 {
                    a.opt("-device", Opts::new("qemu-xhci").set("id", "xhci"));
                }
                let node = Passthrough::usb_node(*bus, *dev);
                let dev = Opts::new("usb-host")
                    .set("bus", "xhci.0")
                    .path("hostdevice", &node)?
                    .set("id", format!("hostusb{usb}"));
                a.opt("-device", dev);
                usb += 1;
            }
        }
    }
    Ok(())
}

/// The shared folders: over virtio-fs when `virtiofs` holds qemu's end of
/// each share's vhost-user socket ([`vhost_user_fs`]), else qemu's own 9p
/// ([`nine_p`]); and the guest's mount table, through fw_cfg.
pub(super) fn shares(
    a: &mut Argv,
    mounts: &[crate::model::share::Mount],
    virtiofs: Option<&[i32]>,
) -> Result<(), QemuError> {
    use crate::model::share::{FW_CFG_NAME, Transport, guest_table};
    if mounts.is_empty() {
        return Ok(());
    }
    let transport = match virtiofs {
        Some(fds) => {
            vhost_user_fs(a, fds);
            Transport::VirtioFs
        }
        None => {
            nine_p(a, mounts)?;
            Transport::NineP
        }
    };
    // Where the guest mounts each (crate::model::share::GUEST_MOUNT_SCRIPT).
    a.opt(
        "-fw_cfg",
        Opts::kv("name", FW_CFG_NAME).set("string", guest_table(mounts, transport)),
    );
    Ok(())
}

/// `vhost-user-fs-pci` per share, its chardev the connected socket nox made
/// (`fd=`): qemu opens no path, and virtiofsd, not qemu, holds the
/// directory. The guest's RAM is shared memory for it (`memfd_object`).
fn vhost_user_fs(a: &mut Argv, fds: &[i32]) {
    for (i, fd) in fds.iter().enumerate() {
        let chardev = format!("vfs{i}");
        a.opt(
            "-chardev",
            Opts::new("socket").set("id", &chardev).set("fd", fd),
        );
        a.opt(
            "-device",
            Opts::new("vhost-user-fs-pci")
                .set("chardev", &chardev)
                .set("tag", crate::model::share::tag(i)),
        );
    }
}

/// `-fsdev local` and `virtio-9p-pci` for each shared folder: qemu serves
/// the directory itself, at its own path inside the jail (crate::vmm::jail binds
/// it there, idmapped as root). `mapped-xattr`: the guest's owners, modes
/// and special files are kept in the files' `user.virtfs.*` xattrs, so the
/// guest can neither chown a host file to anyone nor make a device node
/// on the host (its mknod is a regular file with an xattr), and what it
/// creates is 0600/0700 on the host. `multidevs=forbid`: nothing of
/// another filesystem below the directory is served (the jail's copy of the
/// mount has none anyway).
fn nine_p(a: &mut Argv, mounts: &[crate::model::share::Mount]) -> Result<(), QemuError> {
    for (i, m) in mounts.iter().enumerate() {
        let mut fsdev = Opts::new("local")
            .set("id", crate::model::share::fsdev_id(i))
            .path("path", &m.host)?
            .set("security_model", "mapped-xattr")
            .set("multidevs", "forbid");
        if m.readonly {
            fsdev = fsdev.set("readonly", "on");
        }
        a.opt("-fsdev", fsdev);
        a.opt(
            "-device",
            Opts::new("virtio-9p-pci")
                .set("fsdev", crate::model::share::fsdev_id(i))
                .set("mount_tag", crate::model::share::tag(i)),
        );
    }
    Ok(())
}
