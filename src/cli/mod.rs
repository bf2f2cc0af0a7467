//! The command line: parses arguments ([`args`]), calls one operation of
//! [`crate::ops`] (or a lower layer) per verb and renders what it returns.
//! All printing happens here.

use anyhow::Result;
use clap::Parser;

use crate::store::Store;

mod args;
mod complete;
mod doctor;
mod image;
mod migrate;
mod pipe;
mod remote;
mod render;
mod term;
mod verbs;

pub use args::*;
pub use complete::command;

/// Entry point of the binary: runs the command, prints errors with their
/// causes, returns the exit code.
pub fn main() -> i32 {
    // First, while single-threaded: as root, PATH is not the caller's.
    crate::host::trust::sanitize_env();
    // `nox … | head -1`: end quietly, as a closed pipe conventionally does.
    pipe::install_hook();
    // `COMPLETE=bash nox -- WORDS…` (what the completion script runs):
    // print the candidates and exit.
    clap_complete::CompleteEnv::with_factory(command).complete();
    let cli = Cli::parse();
    // Another host's nox runs it; nothing more happens here.
    if let Some(crate::model::remote::Target::Ssh(host)) = &cli.host {
        return remote::main(host, &cli.cmd);
    }
    let is_run = matches!(cli.cmd, Cmd::Run { .. });
    if is_run {
        crate::supervisor::tune_allocator();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("NOX_LOG")
        .unwrap_or_else(|_| if is_run { "info" } else { "warn" }.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // The supervisor's lines go to its capped nox.log (crate::host::console),
        // whose tail start errors quote: colour codes only on a terminal.
        .with_writer(crate::host::console::supervisor_writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    // One thread is plenty (the supervisor waits on a handful of fds) and
    // keeps the supervisor small.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) if pipe::is_closed_output(&e) => pipe::die_of_sigpipe(),
        Err(e) => {
            // The whole chain on one line: "error: cannot create the VM: invalid VM name ...",
            // each cause once (a wrapper naming its layer also quotes its cause).
            eprintln!("error: {}", crate::error_chain(e.as_ref()));
            1
        }
    }
}

/// One function per verb.
async fn dispatch(cli: Cli) -> Result<i32> {
    // Before the store: `nox --host` asks for it, and a store that cannot
    // be opened must not hide which version answers.
    if let Cmd::Version { json } = cli.cmd {
        return verbs::version(json);
    }
    let store = Store::from_env()?;
    let s = &store;
    match cli.cmd {
        Cmd::Create(a) => verbs::create(s, *a).await,
        Cmd::Start {
            name,
            wait,
            timeout,
        } => verbs::start(s, &name, wait, timeout),
        Cmd::Stop {
            name,
            force,
            timeout,
        } => verbs::stop(s, &name, force, timeout).await,
        Cmd::Restart {
            name,
            wait,
            timeout,
        } => verbs::restart(s, &name, wait, timeout).await,
        Cmd::Delete { name, force } => verbs::delete(s, &name, force).await,
        Cmd::List { json } => verbs::list(s, json),
        Cmd::Info { name, json, boot } => verbs::info(s, &name, json, boot),
        Cmd::Image(cmd) => image::image_cmd(s, cmd).await,
        Cmd::Snapshot(cmd) => image::snapshot_cmd(s, cmd).await,
        Cmd::Disk(cmd) => verbs::disk_cmd(s, cmd).await,
        Cmd::Ip {
            name,
            wait,
            timeout,
            json,
        } => verbs::ip(s, &name, wait, timeout, json).await,
        Cmd::Ssh { name, command } => term::ssh_exec(s, &name, &command),
        Cmd::Console { name } => term::console(s, &name),
        Cmd::Logs { name, follow, raw } => term::logs(s, &name, follow, raw),
        Cmd::Events {
            name,
            json,
            since,
            follow,
        } => term::events(s, name, json, since.as_deref(), follow).await,
        Cmd::Doctor => doctor::doctor(s).await,
        Cmd::Systemd(SystemdCmd::Install { dir, user }) => verbs::systemd_install(s, dir, user),
        Cmd::Systemd(SystemdCmd::Unit { user }) => verbs::systemd_unit(user),
        Cmd::Enable { name } => verbs::enable(s, &name),
        Cmd::Disable { name } => verbs::disable(s, &name),
        Cmd::Clone {
            src,
            new,
            snapshot,
            start,
            wait,
            timeout,
        } => verbs::clone(
            s,
            &src,
            &new,
            snapshot.as_deref(),
            start || wait,
            wait,
            timeout,
        ),
        Cmd::Run { name, ready_listen } => verbs::run(s, &name, ready_listen).await,
        Cmd::Migrate {
            name,
            to,
            offline,
            json,
        } => migrate::migrate(s, &name, &to, offline, json).await,
        Cmd::MigrateIn { name } => migrate::migrate_in(s, &name).await,
        Cmd::MigratePipe { name, which } => migrate::pipe(s, &name, &which),
        Cmd::Set(a) => verbs::set(s, &a),
        Cmd::Cp {
            recursive,
            src,
            dst,
        } => Ok(crate::ops::cp(s, recursive, &src, &dst)?),
        Cmd::Config(ConfigCmd::Show { json }) => doctor::config_show(s, json).await,
        Cmd::Completions { shell } => complete::completions(shell),
        Cmd::Man { dir } => complete::man(dir.as_deref()),
        Cmd::Version { json } => verbs::version(json),
    }
}
