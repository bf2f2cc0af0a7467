//! Extra disks plugged into and out of a running qemu, over its checked
//! `ctl.sock` (crate::vmm::rundir::connect_ctl).
//!
//! qemu's jail (its mount namespace) was fixed when it started, so a disk
//! made since is not in it: root opens the file and hands qemu the
//! descriptor (`add-fd`, SCM_RIGHTS) in an fd set, the block node is made on
//! `/dev/fdset/N`, and the virtio-blk device goes on one of the VM's free
//! hotplug ports (crate::vmm::qemu::HOTPLUG_PORTS). Removal is the reverse: the
//! guest is asked to release the device (`device_del`, answered by
//! `DEVICE_DELETED`), then the node and the fd set go.

use std::os::fd::AsFd;
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;

use crate::host::qmp::{DEFAULT_TIMEOUT, Events, Qmp, QmpError};
use crate::model::disk::DiskName;
use crate::model::ident::VmName;
use crate::store::VmPaths;

/// How long the guest gets to release an unplugged disk.
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum PlugError {
    #[error("cannot reach {0}'s qemu")]
    Connect(VmName, #[source] QmpError),
    #[error("{vm}: {step}")]
    Qmp {
        vm: VmName,
        step: &'static str,
        #[source]
        source: QmpError,
    },
    #[error(
        "{0} has no free hotplug port (qemu gets {n} free ones per start, none if an older nox \
         started it); stop and start it, then add the disk (or add it while it is stopped: it \
         is plugged in at the next start)",
        n = crate::vmm::qemu::HOTPLUG_PORTS
    )]
    NoFreePort(VmName),
    #[error(
        "{vm}: the guest did not release disk {disk} within {} s (its OS must support PCIe \
         hotplug); it stays attached and recorded", .after.as_secs()
    )]
    NotReleased {
        vm: VmName,
        disk: DiskName,
        after: Duration,
    },
}

/// Plugs disk `name`, whose file is `file` (opened by root, owned by the
/// VM's ids), into the running VM. On failure nothing stays in qemu.
pub async fn attach(vm: &VmPaths, name: &DiskName, file: &std::fs::File) -> Result<(), PlugError> {
    let (q, _events) = crate::vmm::rundir::connect_ctl(vm, Duration::from_secs(5))
        .await
        .map_err(|e| PlugError::Connect(vm.name.clone(), e))?;
    let err = |step| {
        let vm = vm.name.clone();
        move |source| PlugError::Qmp { vm, step, source }
    };
    let port = free_port(&q)
        .await
        .map_err(err("qom-list"))?
        .ok_or_else(|| PlugError::NoFreePort(vm.name.clone()))?;
    let node = name.node_name();
    let fdset = q.add_fd(&node, file.as_fd()).await.map_err(err("add-fd"))?;
    let added = q
        .execute_raw(
            "blockdev-add",
            crate::vmm::qemu::blockdev_json(name, &format!("/dev/fdset/{fdset}")),
            DEFAULT_TIMEOUT,
        )
        .await
        .map_err(err("blockdev-add"));
    if let Err(e) = added {
        remove_fdset(&q, fdset).await;
        return Err(e);
    }
    let plugged = q
        .execute_raw(
            "device_add",
            crate::vmm::qemu::disk_device_json(name, &port),
            DEFAULT_TIMEOUT,
        )
        .await
        .map_err(err("device_add"));
    if let Err(e) = plugged {
        let _ = q
            .execute_raw(
                "blockdev-del",
                json!({ "node-name": node }),
                DEFAULT_TIMEOUT,
            )
            .await;
        remove_fdset(&q, fdset).await;
        return Err(e);
    }
    Ok(())
}

/// Unplugs disk `name` from the running VM: the guest releases the device,
/// then its node and (for a disk plugged while it ran) its fd set go. A
/// device already gone is not an error.
pub async fn detach(vm: &VmPaths, name: &DiskName, timeout: Duration) -> Result<(), PlugError> {
    let (q, mut events) = crate::vmm::rundir::connect_ctl(vm, Duration::from_secs(5))
        .await
        .map_err(|e| PlugError::Connect(vm.name.clone(), e))?;
    let err = |step| {
        let vm = vm.name.clone();
        move |source| PlugError::Qmp { vm, step, source }
    };
    let id = name.device_id();
    match q
        .execute_raw("device_del", json!({ "id": id }), DEFAULT_TIMEOUT)
        .await
    {
        Ok(_) => {
            if !deleted(&mut events, &id, timeout).await {
                return Err(PlugError::NotReleased {
                    vm: vm.name.clone(),
                    disk: name.clone(),
                    after: timeout,
                });
            }
        }
        Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {}
        Err(e) => return Err(err("device_del")(e)),
    }
    let node = name.node_name();
    match q
        .execute_raw(
            "blockdev-del",
            json!({ "node-name": node }),
            DEFAULT_TIMEOUT,
        )
        .await
    {
        Ok(_) => {}
        // Gone already (an earlier removal that failed after this step).
        Err(QmpError::Command { desc, .. }) if desc.contains("Failed to find node") => {}
        Err(e) => return Err(err("blockdev-del")(e)),
    }
    let sets = q
        .execute_raw("query-fdsets", Value::Null, DEFAULT_TIMEOUT)
        .await
        .map_err(err("query-fdsets"))?;
    for fdset in fdsets_tagged(&sets, &node) {
        remove_fdset(&q, fdset).await;
    }
    Ok(())
}

/// Waits for `DEVICE_DELETED` of device `id`.
async fn deleted(events: &mut Events, id: &str, timeout: Duration) -> bool {
    let wait = async {
        while let Some(ev) = events.recv().await {
            if ev.name == "DEVICE_DELETED" && ev.data["device"] == id {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(timeout, wait).await.unwrap_or(false)
}

async fn remove_fdset(q: &Qmp, fdset: u64) {
    if let Err(e) = q
        .execute_raw("remove-fd", json!({ "fdset-id": fdset }), DEFAULT_TIMEOUT)
        .await
    {
        tracing::warn!("remove-fd {fdset}: {e}");
    }
}

/// The first of nox's hotplug ports no device sits on. A port's bus is
/// named after it (`/machine/peripheral/nox-hp0/nox-hp0`); every device
/// with an id is under /machine/peripheral with its `parent_bus`. (Not
/// `query-pci`: it lists no device behind a port the guest has not
/// numbered yet.)
async fn free_port(q: &Qmp) -> Result<Option<String>, QmpError> {
    let list = q
        .execute_raw(
            "qom-list",
            json!({ "path": "/machine/peripheral" }),
            DEFAULT_TIMEOUT,
        )
        .await?;
    let devices = peripherals(&list);
    let mut buses = vec![];
    for child in &devices {
        let bus = q
            .execute_raw(
                "qom-get",
                json!({ "path": format!("/machine/peripheral/{child}"), "property": "parent_bus" }),
                DEFAULT_TIMEOUT,
            )
            .await?;
        if let Some(b) = bus.as_str() {
            buses.push(b.to_string());
        }
    }
    Ok(first_free(&devices, &buses))
}

/// The ids of the devices in a `qom-list` of /machine/peripheral.
fn peripherals(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"].as_str().is_some_and(|t| t.starts_with("child<")))
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

/// The first of nox's ports among `devices` (the peripherals' ids) whose
/// bus is none of `buses`: the free ones, and those whose disk was
/// unplugged (a disk present at the start has a port of its own).
fn first_free(devices: &[String], buses: &[String]) -> Option<String> {
    let mut ports: Vec<(usize, &String)> = devices
        .iter()
        .filter_map(|d| Some((d.strip_prefix("nox-hp")?.parse().ok()?, d)))
        .collect();
    ports.sort();
    ports
        .into_iter()
        .map(|(_, p)| p)
        .find(|port| {
            !buses
                .iter()
                .any(|b| b.rsplit('/').next() == Some(port.as_str()))
        })
        .cloned()
}

/// The fd sets whose descriptors are tagged `opaque`, from `query-fdsets`.
fn fdsets_tagged(sets: &Value, opaque: &str) -> Vec<u64> {
    sets.as_array()
        .into_iter()
        .flatten()
        .filter(|s| {
            s["fds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| f["opaque"] == opaque)
        })
        .filter_map(|s| s["fdset-id"].as_u64())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_free_port() {
        let list = json!([
            {"name": "type", "type": "string"},
            {"name": "nox-hp1", "type": "child<pcie-root-port>"},
            {"name": "xdev-b", "type": "child<virtio-blk-pci>"},
            {"name": "nox-hp0", "type": "child<pcie-root-port>"},
        ]);
        assert_eq!(peripherals(&list), ["nox-hp1", "xdev-b", "nox-hp0"]);
        let on = |p: &str| format!("/machine/peripheral/{p}/{p}");
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let devices = ids(&[
            "nox-hp10", "nox-hp9", "nox-hp2", "nox-hp1", "nox-hp0", "xdev-a",
        ]);
        assert_eq!(first_free(&devices, &[]).as_deref(), Some("nox-hp0"));
        let buses = vec![
            "/machine/q35/pcie.0".to_string(),
            on("nox-hp0"),
            on("nox-hp1"),
        ];
        assert_eq!(first_free(&devices, &buses).as_deref(), Some("nox-hp2"));
        let all: Vec<String> = devices.iter().map(|d| on(d)).collect();
        assert_eq!(first_free(&devices, &all), None);
        // Numerically: hp9 before hp10.
        let buses = ids(&[&on("nox-hp0"), &on("nox-hp1"), &on("nox-hp2")]);
        assert_eq!(first_free(&devices, &buses).as_deref(), Some("nox-hp9"));
        assert_eq!(first_free(&[], &[]), None);
    }

    #[test]
    fn finds_fdsets_by_tag() {
        let sets = json!([
            {"fdset-id": 2, "fds": [{"fd": 5, "opaque": "console-log"}]},
            {"fdset-id": 3, "fds": [{"fd": 7, "opaque": "xdisk-data"}]},
            {"fdset-id": 4, "fds": [{"fd": 8}]},
        ]);
        assert_eq!(fdsets_tagged(&sets, "xdisk-data"), vec![3]);
        assert!(fdsets_tagged(&sets, "xdisk-x").is_empty());
    }
}
