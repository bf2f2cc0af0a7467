//! Shell completion (dynamic: VM and image names) and man pages.

use anyhow::{Context, Result};

use crate::store::Store;

use super::{Cli, CompletionShell};

/// The clap command with dynamic completions: existing VM names for the
/// commands that take one, image names for `--image` and `image rm`, and
/// `NAME:` or host paths for `cp`. Completion runs through clap_complete's
/// `CompleteEnv`: the shell script calls `COMPLETE=bash nox -- WORDS…`.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    use clap_complete::engine::{ArgValueCandidates, ArgValueCompleter};
    let vms = ArgValueCandidates::new(|| complete_vms(""));
    let images = ArgValueCandidates::new(|| complete_images(true));
    let cached = ArgValueCandidates::new(|| complete_images(false));
    let cp_path = ArgValueCompleter::new(complete_cp_path);
    // In place (`mut_args`): `mut_arg` re-appends the argument, which would
    // renumber positionals (ssh's NAME would come after its COMMAND).
    let with = |c: clap::Command, id: &'static str, f: &dyn Fn(clap::Arg) -> clap::Arg| {
        c.mut_args(|a| if a.get_id() == id { f(a) } else { a })
    };
    let mut cmd = Cli::command();
    for sub in cmd.get_subcommands_mut() {
        let name = sub.get_name().to_string();
        let mut s = std::mem::take(sub);
        match name.as_str() {
            // `create`'s NAME is a new one.
            "create" => s = with(s, "image", &|a| a.add(images.clone())),
            "cp" => {
                s = with(s, "src", &|a| a.add(cp_path.clone()));
                s = with(s, "dst", &|a| a.add(cp_path.clone()));
            }
            "image" => {
                for r in s.get_subcommands_mut() {
                    *r = with(std::mem::take(r), "image", &|a| a.add(cached.clone()));
                }
            }
            _ => s = with(s, "name", &|a| a.add(vms.clone())),
        }
        *sub = s;
    }
    cmd
}

fn complete_vms(suffix: &str) -> Vec<clap_complete::CompletionCandidate> {
    let Ok(store) = Store::from_env() else {
        return vec![];
    };
    store
        .list()
        .unwrap_or_default()
        .into_iter()
        .map(|n| clap_complete::CompletionCandidate::new(format!("{n}{suffix}")))
        .collect()
}

/// Cached images' names, and with `catalog` the catalog's.
fn complete_images(catalog: bool) -> Vec<clap_complete::CompletionCandidate> {
    let mut names: Vec<String> = crate::image::CATALOG
        .iter()
        .filter(|_| catalog)
        .map(|e| e.name.to_string())
        .collect();
    if let Ok(store) = Store::from_env()
        && let Ok(cache) = crate::image::Cache::open(&store.images_dir())
    {
        names.extend(
            cache
                .list()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|i| i.name),
        );
    }
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(clap_complete::CompletionCandidate::new)
        .collect()
}

/// `nox cp` operands: `NAME:` for each VM, and host paths.
fn complete_cp_path(current: &std::ffi::OsStr) -> Vec<clap_complete::CompletionCandidate> {
    let cur = current.to_string_lossy();
    if cur.contains(':') {
        // A path in the guest: not known on the host.
        return vec![];
    }
    let mut c: Vec<_> = complete_vms(":")
        .into_iter()
        .filter(|v| v.get_value().to_string_lossy().starts_with(&*cur))
        .collect();
    use clap_complete::engine::ValueCompleter;
    c.extend(clap_complete::engine::PathCompleter::any().complete(current));
    c
}

pub fn completions(shell: CompletionShell) -> Result<i32> {
    use clap_complete::env::EnvCompleter;
    let sh: &dyn EnvCompleter = match shell {
        CompletionShell::Bash => &clap_complete::env::Bash,
        CompletionShell::Zsh => &clap_complete::env::Zsh,
        CompletionShell::Fish => &clap_complete::env::Fish,
    };
    let mut out = std::io::stdout().lock();
    // The script calls `nox` from PATH back for every completion, so the
    // VM names it offers are always the current ones.
    sh.write_registration("COMPLETE", "nox", "nox", "nox", &mut out)?;
    Ok(0)
}

pub fn man(dir: Option<&std::path::Path>) -> Result<i32> {
    let cmd = command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout().lock())?;
        return Ok(0);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut pages = vec![("nox.1".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = format!("nox-{}", sub.get_name());
        let sub = sub
            .clone()
            .display_name(page.clone())
            .bin_name(format!("nox {}", sub.get_name()));
        pages.push((format!("{page}.1"), sub));
    }
    for (file, page) in pages {
        let mut buf = vec![];
        clap_mangen::Man::new(page)
            .source(concat!("nox ", env!("CARGO_PKG_VERSION")))
            .render(&mut buf)?;
        let path = dir.join(&file);
        crate::store::write_atomic(&path, &buf, 0o644)?;
        println!("{}", path.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_command_is_consistent() {
        command().debug_assert();
        let cmd = command();
        // VM names are offered where an existing VM is named, not at create.
        let has_vms = |sub: &str| {
            cmd.find_subcommand(sub)
                .and_then(|s| s.get_arguments().find(|a| a.get_id() == "name"))
                .is_some_and(|a| {
                    a.get::<clap_complete::engine::ArgValueCandidates>()
                        .is_some()
                })
        };
        for sub in ["start", "stop", "set", "ssh", "delete", "info", "logs"] {
            assert!(has_vms(sub), "{sub}");
        }
        assert!(!has_vms("create"));
    }
}
