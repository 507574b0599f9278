//! The operations handle: what the admin API and reloads need to act on a running proxy.
//!
//! It owns what only the operator side touches — the config file reloads re-read, the
//! rollout journal, the sender of operator commands to the control-plane thread and the lock
//! that keeps reloads from interleaving — and holds the [`DataPlane`] it publishes new
//! generations into. The data plane never sees it.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use crate::control::CommandSender;
use crate::data_plane::DataPlane;
use crate::fleet::Fleet;
use crate::history::RolloutHistory;
use crate::journal::Journal;
use crate::snapshot::Snapshot;
use crate::telemetry::Telemetry;

/// The operator side of a running proxy: config path, journal, commands, reload lock, and
/// the data plane it publishes into.
pub struct Operations {
    data: Arc<DataPlane>,
    /// The config file reloads re-read.
    pub config_path: PathBuf,
    /// The rollout journal (`state.dir` as of start).
    pub journal: Arc<Journal>,
    commands: OnceLock<CommandSender>,
    fleet: OnceLock<Arc<Fleet>>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Operations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operations")
            .field("config_path", &self.config_path)
            .field("data", &self.data)
            .finish_non_exhaustive()
    }
}

impl Operations {
    /// The operator side of `data`, reloading from `config_path` and recording in `journal`.
    /// Commands are refused (503) until [`Operations::connect_control`] is called.
    pub fn new(data: Arc<DataPlane>, config_path: PathBuf, journal: Arc<Journal>) -> Operations {
        Operations {
            data,
            config_path,
            journal,
            commands: OnceLock::new(),
            fleet: OnceLock::new(),
            reload_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The data plane this side publishes into.
    pub fn data(&self) -> &Arc<DataPlane> {
        &self.data
    }

    /// The current configuration generation.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.data.snapshot()
    }

    /// This proxy's metrics registry.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.data.telemetry
    }

    /// Routes operator commands to the control-plane thread behind `sender` (once; a second
    /// call is ignored).
    pub fn connect_control(&self, sender: CommandSender) {
        let _ = self.commands.set(sender);
    }

    /// Fleet mode: history is read from the fleet (once; a second call is ignored).
    pub fn connect_fleet(&self, fleet: Arc<Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    /// The fleet this replica belongs to, in fleet mode.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.get()
    }

    /// Where this replica's rollout history is read: the fleet's in fleet mode, else the
    /// local journal.
    pub fn history(&self) -> &dyn RolloutHistory {
        match self.fleet.get() {
            Some(fleet) => fleet,
            None => &self.journal,
        }
    }

    /// Where operator commands go (the control-plane thread), once it runs.
    pub fn commands(&self) -> Option<&CommandSender> {
        self.commands.get()
    }

    /// Held while a reload reads, validates and publishes, so reloads never interleave.
    pub(crate) async fn reload_guard(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reload_lock.lock().await
    }

    /// True once shutdown has begun; `/readyz` answers 503.
    pub fn is_draining(&self) -> bool {
        self.data.is_draining()
    }
}
