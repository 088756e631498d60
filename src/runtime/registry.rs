//! The relays this process runs, by `namespace/name`: one in standalone
//! mode, one per `TransactionRelay` under the operator. The only record of
//! them: the [`Supervisor`](super::Supervisor) puts and takes entries, and
//! `/new` and the admin API resolve against the same map.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::settings::RelayHandle;
use crate::spec::RelayId;

#[derive(Debug, Default)]
pub struct Registry {
    running: RwLock<BTreeMap<RelayId, Running>>,
    /// Relays that exist but could not start yet (database down, secret
    /// missing): `/new` answers 503 for them rather than 404.
    starting: RwLock<BTreeMap<RelayId, String>>,
    default: Option<RelayId>,
    /// The process is shutting down: every request is told so (503), not
    /// that its token is unknown once the relays are gone.
    closing: AtomicBool,
}

/// One running relay: what requests reach, and what stops it.
#[derive(Debug)]
pub struct Running {
    pub handle: RelayHandle,
    /// Of the settings it was built from (see `RelaySettings::fingerprint`).
    pub(super) fingerprint: u64,
    /// Stops its tasks; `None` for a relay whose loops run elsewhere (a
    /// test's own, or a one-shot command's).
    pub(super) stop: Option<watch::Sender<bool>>,
    pub(super) tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// A relay served here whose loops this process does not run.
    pub fn served(handle: RelayHandle) -> Self {
        Self { handle, fingerprint: 0, stop: None, tasks: Vec::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no relay {0} is served here")]
    Unknown(RelayId),
    #[error("relay {0} is not running yet: {1}")]
    NotReady(RelayId, String),
    #[error("no relay is served here yet")]
    None,
    #[error("several relays are served here and none was named (one of: {0})")]
    Ambiguous(String),
}

impl Registry {
    /// `default` is the relay plain `/new` reaches when several are served.
    pub fn new(default: Option<RelayId>) -> Self {
        Self { default, ..Self::default() }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<RelayId, Running>> {
        self.running.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<RelayId, Running>> {
        self.running.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the process as shutting down, before its relays are removed.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Serves `running` under its id; returns the entry it replaces.
    pub fn put(&self, running: Running) -> Option<Running> {
        let id = running.handle.relay.id().clone();
        self.starting.write().unwrap_or_else(|e| e.into_inner()).remove(&id);
        self.write().insert(id, running)
    }

    /// Serves a relay whose loops run elsewhere (tests, one-shot commands).
    pub fn insert(&self, handle: RelayHandle) -> Option<Running> {
        self.put(Running::served(handle))
    }

    /// Stops serving a relay; returns its entry, for the caller to stop it.
    pub fn take(&self, id: &RelayId) -> Option<Running> {
        self.starting.write().unwrap_or_else(|e| e.into_inner()).remove(id);
        self.write().remove(id)
    }

    /// Takes every entry for which `keep` is false.
    pub(super) fn take_unless(&self, keep: impl Fn(&RelayId) -> bool) -> Vec<Running> {
        let mut running = self.write();
        let gone: Vec<RelayId> = running.keys().filter(|id| !keep(id)).cloned().collect();
        gone.iter().filter_map(|id| running.remove(id)).collect()
    }

    /// Changes a running relay's entry in place.
    pub(super) fn update<R>(&self, id: &RelayId, change: impl FnOnce(&mut Running) -> R) -> Option<R> {
        self.write().get_mut(id).map(change)
    }

    /// Marks a relay that exists but is not running, with the reason.
    pub fn set_not_ready(&self, id: &RelayId, reason: &str) {
        if !self.read().contains_key(id) {
            self.starting.write().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), reason.to_owned());
        }
    }

    /// Forgets a relay that is not running (its resource was deleted).
    pub fn forget_not_ready(&self, keep: impl Fn(&RelayId) -> bool) {
        self.starting.write().unwrap_or_else(|e| e.into_inner()).retain(|id, _| keep(id));
    }

    pub fn get(&self, id: &RelayId) -> Option<RelayHandle> {
        self.read().get(id).map(|r| r.handle.clone())
    }

    pub fn ids(&self) -> Vec<RelayId> {
        self.read().keys().cloned().collect()
    }

    /// Whether any running relay satisfies `check` (without cloning them).
    pub fn any(&self, check: impl Fn(&RelayHandle) -> bool) -> bool {
        self.read().values().any(|r| check(&r.handle))
    }

    pub fn all(&self) -> Vec<RelayHandle> {
        self.read().values().map(|r| r.handle.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The named relay, or for the plain paths the default one: the one
    /// named by `--default-relay`, else the only one served.
    pub fn resolve(&self, id: Option<&RelayId>) -> Result<RelayHandle, ResolveError> {
        let relays = self.read();
        if let Some(id) = id.or(self.default.as_ref()) {
            return relays.get(id).map(|r| r.handle.clone()).ok_or_else(|| {
                match self.starting.read().unwrap_or_else(|e| e.into_inner()).get(id) {
                    Some(reason) => ResolveError::NotReady(id.clone(), reason.clone()),
                    None => ResolveError::Unknown(id.clone()),
                }
            });
        }
        let mut all = relays.values();
        match (all.next(), all.next()) {
            (Some(only), None) => Ok(only.handle.clone()),
            (None, _) => Err(ResolveError::None),
            (Some(_), Some(_)) => {
                Err(ResolveError::Ambiguous(relays.keys().map(ToString::to_string).collect::<Vec<_>>().join(", ")))
            }
        }
    }
}
