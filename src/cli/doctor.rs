//! `nox doctor` and `nox config show`: host and configuration reports.

use anyhow::Result;

use crate::host::config::Origin;
use crate::ops::{self, Check};
use crate::store::Store;

pub async fn doctor(store: &Store) -> Result<i32> {
    let lines = ops::doctor(store).await?;
    for l in &lines {
        let label = match l.check {
            Check::Ok => "ok  ",
            Check::Warn => "warn",
            Check::Fail => "FAIL",
        };
        println!("{label} {}: {}", l.what, l.detail);
    }
    Ok(ops::exit_code(&lines))
}

pub async fn config_show(store: &Store, json: bool) -> Result<i32> {
    let cfg = ops::load_config(store)?;
    for w in ops::config_warnings(&cfg) {
        eprintln!("{w}");
    }
    let v = ops::config_show(&cfg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let from = |o: Origin| match o {
        Origin::Config => "config.json",
        Origin::BuiltIn => "built-in",
    };
    let (d, o) = (&v.defaults, &v.origin);
    println!(
        "# {}{}",
        v.path.display(),
        if v.exists { "" } else { " (absent)" }
    );
    println!("image:    {:<24} {}", d.image, from(o.image));
    println!("cpus:     {:<24} {}", d.cpus, from(o.cpus));
    println!("memory:   {:<24} {}", d.memory, from(o.memory));
    println!("disk:     {:<24} {}", d.disk, from(o.disk));
    let network = match &d.network {
        Some(n) => n.clone(),
        None => format!("auto ({})", crate::ops::vm::default_network().await.1),
    };
    println!("network:  {:<24} {}", network, from(o.network));
    let keys = if d.ssh_keys.is_empty() {
        "~/.ssh/id_*.pub".to_string()
    } else {
        d.ssh_keys
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("ssh_keys: {:<24} {}", keys, from(o.ssh_keys));
    println!("user:     {:<24} {}", d.user, from(o.user));
    println!("warm:     {:<24} {}", d.warm, from(o.warm));
    Ok(0)
}
