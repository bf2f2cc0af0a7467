//! `nox migrate` and its hidden target-side verbs: parse, call
//! crate::ops::migrate, render. Progress goes to stderr (stdout is the result,
//! or `--json`); the exit code is the error's (crate::ops::migrate::MigrateError).

use anyhow::Result;

use crate::model::ident::VmName;
use crate::model::migwire::Mode;
use crate::model::remote::Host;
use crate::ops::migrate::{self, Step};
use crate::store::Store;

pub async fn migrate(
    store: &Store,
    name: &VmName,
    to: &Host,
    offline: bool,
    json: bool,
) -> Result<i32> {
    let mode = if offline { Mode::Offline } else { Mode::Live };
    let mut progress = |s: Step| {
        let line = match s {
            Step::Accepted { base: true, bytes } => format!(
                "{to} accepted {name}; sending its base image ({} MiB, not cached there)",
                bytes >> 20
            ),
            Step::Accepted { base: false, .. } => {
                format!("{to} accepted {name} (its base image is cached there)")
            }
            Step::Sent { bytes } => format!("sent and verified {} MiB", bytes >> 20),
            Step::Mirrored => "disk mirrored; migrating memory".into(),
            Step::Migrated(m) => format!(
                "migrated in {} ms, guest paused {} ms",
                m.total_ms, m.downtime_ms
            ),
            Step::Arrived => format!("{name} is on {to}"),
            Step::Removed => format!("{name} removed here"),
        };
        if !json {
            eprintln!("{line}");
        }
    };
    match migrate::migrate(store, name, to, mode, &mut progress).await {
        Ok(m) => {
            if json {
                let v = serde_json::json!({
                    "name": m.name,
                    "to": m.to,
                    "mode": m.mode,
                    "took_ms": m.took.as_millis() as u64,
                    "base_sent": m.base_sent,
                    "bytes_sent": m.bytes_sent,
                    "migration": m.measured.map(|x| serde_json::json!({
                        "total_ms": x.total_ms,
                        "downtime_ms": x.downtime_ms,
                        "ram_bytes": x.transferred,
                    })),
                });
                println!("{v}");
            } else {
                println!(
                    "{} moved to {} ({}) in {:.1} s",
                    m.name,
                    m.to,
                    match m.mode {
                        Mode::Live => "live",
                        Mode::Offline => "offline",
                    },
                    m.took.as_secs_f64()
                );
            }
            Ok(0)
        }
        Err(e) => {
            eprintln!("error: {}", crate::error_chain(&e));
            Ok(e.exit_code())
        }
    }
}

pub async fn migrate_in(store: &Store, name: &VmName) -> Result<i32> {
    migrate::receive(store, name).await?;
    Ok(0)
}

pub fn pipe(store: &Store, name: &VmName, which: &str) -> Result<i32> {
    migrate::pipe(store, name, which)?;
    Ok(0)
}
