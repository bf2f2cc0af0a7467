//! config.json as the verbs see it: loaded with its warnings, and the
//! effective defaults of `nox create` with where each comes from.

use std::path::PathBuf;

use serde::Serialize;

use crate::host::config::{Config, Origin};
use crate::store::Store;

use super::OpsError;

/// The store's config.json (absent: every default built in).
pub fn load_config(store: &Store) -> Result<std::sync::Arc<Config>, OpsError> {
    Ok(store.config()?)
}

/// A top-level key nothing reads is most likely a typo of `defaults`.
pub fn config_warnings(cfg: &Config) -> Vec<String> {
    cfg.unknown_keys
        .iter()
        .map(|k| {
            format!(
                "warning: {}: unknown key {k:?} (ignored; known: defaults, {})",
                cfg.path.display(),
                crate::host::config::OTHER_KEYS.join(", ")
            )
        })
        .collect()
}

/// `nox config show --json` (fields in the order of the JSON keys).
#[derive(Debug, Clone, Serialize)]
pub struct ConfigView {
    pub defaults: DefaultsView,
    pub exists: bool,
    pub origin: OriginView,
    pub path: PathBuf,
}

/// The effective defaults; `network` None: chosen at each create.
#[derive(Debug, Clone, Serialize)]
pub struct DefaultsView {
    pub cpus: u32,
    pub disk: String,
    pub image: String,
    pub memory: String,
    pub network: Option<String>,
    pub ssh_keys: Vec<PathBuf>,
    pub user: crate::model::ident::UserName,
    pub warm: bool,
}

/// Where each default comes from.
#[derive(Debug, Clone, Serialize)]
pub struct OriginView {
    pub cpus: Origin,
    pub disk: Origin,
    pub image: Origin,
    pub memory: Origin,
    pub network: Origin,
    pub ssh_keys: Origin,
    pub user: Origin,
    pub warm: Origin,
}

/// The effective defaults of `nox create` in `cfg`.
pub fn config_show(cfg: &Config) -> Result<ConfigView, crate::host::config::ConfigError> {
    let e = cfg.defaults()?.effective();
    Ok(ConfigView {
        defaults: DefaultsView {
            cpus: e.cpus.0,
            disk: e.disk.0,
            image: e.image.0,
            memory: e.memory.0,
            network: e.network.0.as_ref().map(|n| n.to_string()),
            ssh_keys: e.ssh_keys.0,
            user: e.user.0,
            warm: e.warm.0,
        },
        exists: cfg.exists,
        origin: OriginView {
            cpus: e.cpus.1,
            disk: e.disk.1,
            image: e.image.1,
            memory: e.memory.1,
            network: e.network.1,
            ssh_keys: e.ssh_keys.1,
            user: e.user.1,
            warm: e.warm.1,
        },
        path: cfg.path.clone(),
    })
}
