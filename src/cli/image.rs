//! `nox image …` and `nox snapshot …`.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::image::Cache;
use crate::ops::snapshot::{self, Restored};
use crate::ops::vm::Stopped;
use crate::ops::{self, PruneEvent, PullEvent};
use crate::store::Store;

use super::render;
use super::{ImageCmd, SnapshotCmd};

pub async fn image_cmd(store: &Store, cmd: ImageCmd) -> Result<i32> {
    store.init()?;
    let cache = Cache::for_store(store)?;
    match cmd {
        ImageCmd::Pull {
            source,
            checksum,
            insecure,
            arch,
            warm,
            no_warm,
        } => {
            let r = ops::PullRequest {
                source,
                checksum,
                insecure,
                arch,
                warm: match (warm, no_warm) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
            };
            pull(store, &cache, &r).await?
        }
        ImageCmd::Import { file, name } => {
            let img = cache.import_file(&file, name.as_deref())?;
            ops::prime_boot(&cache, &img);
            println!(
                "{} {}",
                img.digest,
                img.name.as_deref().unwrap_or(&img.source)
            );
        }
        ImageCmd::List { json } => {
            let rows = ops::image_list(store, &cache)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                render::image_table(&rows);
            }
        }
        ImageCmd::Remove { image, force } => {
            let r = ops::image_rm(store, &cache, &image, force)?;
            render::boot_cache(&r.boot_cache);
            match &r.warm {
                Some(Ok(t)) => println!("Removed its warm template {t}"),
                Some(Err(why)) => eprintln!("warning: {why}"),
                None => {}
            }
            if r.users.is_empty() {
                println!("Removed {}", r.digest);
            } else {
                // The VMs' overlays now lack their base: say which.
                println!(
                    "Removed {} (VMs that can no longer start: {})",
                    r.digest,
                    r.users.join(", ")
                );
            }
        }
        ImageCmd::Commit {
            name,
            template,
            warm,
        } => commit(store, &name, &template, warm).await?,
        ImageCmd::Prune => ops::image_prune(store, &cache, &mut |e| match e {
            PruneEvent::Leftover(name) => println!("Removed leftover {name}"),
            PruneEvent::Image(digest, name) => println!("Removed {digest} {name}"),
            PruneEvent::BootCache(r) => render::boot_cache(&r),
        })?,
    }
    Ok(0)
}

async fn pull(store: &Store, cache: &Cache, r: &ops::PullRequest) -> Result<()> {
    let cfg = ops::load_config(store).context("cannot pull the image")?;
    for w in ops::config_warnings(&cfg) {
        eprintln!("{w}");
    }
    ops::image_pull(store, cache, &cfg, r, &mut |e| match e {
        PullEvent::Pulled(img) => println!(
            "{} {} ({} MiB)",
            img.digest,
            img.name.as_deref().unwrap_or(&img.source),
            img.size >> 20
        ),
        PullEvent::UpToDate(t) => println!("Warm template {t} is of this build already"),
        PullEvent::Replaced(t, d) => println!("Removed warm template {t} ({d}) of an older build"),
        PullEvent::Builder(vm, notes) => {
            for n in notes {
                eprintln!("{n}");
            }
            println!("Making warm template: booting builder VM {vm}");
        }
        PullEvent::BuilderReady(vm, t) => {
            println!("{vm} is ready ({:.1} s); committing it --warm", t.as_secs_f64())
        }
        PullEvent::Committed(c) => {
            let t = &c.template;
            println!(
                "Made warm template {}: {} ({} MiB; saved in {:.1} s). `nox create --image {}` of this shape resumes it",
                t.name,
                c.image.digest,
                c.image.size >> 20,
                c.clean_time.as_secs_f64()
                    + c.convert_time.as_secs_f64()
                    + c.save_time.map_or(0.0, |d| d.as_secs_f64())
                    + c.share_time.map_or(0.0, |d| d.as_secs_f64()),
                r.source
            )
        }
        PullEvent::Warning(w) => eprintln!("{w}"),
    })
    .await?;
    Ok(())
}

async fn commit(
    store: &Store,
    name: &crate::model::ident::VmName,
    template: &crate::model::ident::TemplateName,
    warm: bool,
) -> Result<()> {
    let c = crate::ops::template::commit(store, name, template, warm)
        .await
        .with_context(|| format!("cannot commit {name} as template {template}"))?;
    if let Stopped::Forced(why) = &c.stopped {
        eprintln!("warning: {name} did not power off by itself: {why}");
    }
    if !c.left_out_disks.is_empty() {
        eprintln!(
            "note: the template holds {name}'s root disk only, not its extra disks ({})",
            c.left_out_disks.join(", ")
        );
    }
    println!(
        "Committed {name} as template {template}: {} ({} MiB; guest cleaned and stopped in {:.1} s, image written in {:.1} s)",
        c.image.digest,
        c.image.size >> 20,
        c.clean_time.as_secs_f64(),
        c.convert_time.as_secs_f64()
    );
    if let (Some(t), Some(w)) = (c.save_time, &c.template.warm) {
        println!(
            "Saved the running guest's machine state in {:.1} s: VMs made from {template} resume it",
            t.as_secs_f64()
        );
        if let (Some(t), Some(r)) = (c.share_time, &w.ram) {
            println!(
                "Made its RAM image ({} MiB) and device state ({} KiB) in {:.1} s: VMs made from {template} share the RAM pages they do not write",
                r.size >> 20,
                w.size >> 10,
                t.as_secs_f64()
            );
        }
    }
    Ok(())
}

pub async fn snapshot_cmd(store: &Store, cmd: SnapshotCmd) -> Result<i32> {
    match cmd {
        SnapshotCmd::Create { name, snap } => {
            let c = snapshot::create(store, &name, snap)
                .await
                .with_context(|| format!("cannot snapshot {name}"))?;
            let what = if c.ram { "with RAM, live" } else { "disk only" };
            println!(
                "Snapshot {} of {name} taken ({what}, {:.1} s)",
                c.snap,
                c.took.as_secs_f64()
            );
        }
        SnapshotCmd::List { name, json } => {
            let snaps = snapshot::list(&store.vm(&name)?)
                .with_context(|| format!("cannot list the snapshots of {name}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snaps)?);
            } else {
                render::snapshot_table(&snaps);
            }
        }
        SnapshotCmd::Restore {
            name,
            snap,
            timeout,
        } => {
            let r = snapshot::restore(store, &name, &snap, Duration::from_secs(timeout))
                .await
                .with_context(|| format!("cannot restore {name} to snapshot {snap}"))?;
            match r {
                Restored::Live => println!("{name} runs from snapshot {snap}"),
                Restored::Started => println!("{name} started from snapshot {snap}"),
                Restored::Disk => println!("{name}'s disk is back at snapshot {snap}"),
            }
        }
        SnapshotCmd::Delete { name, snap } => {
            snapshot::delete(store, &name, &snap)
                .await
                .with_context(|| format!("cannot delete snapshot {snap} of {name}"))?;
            println!("Deleted snapshot {snap} of {name}");
        }
    }
    Ok(0)
}
