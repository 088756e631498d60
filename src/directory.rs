//! The relays this process serves, by `namespace/name`: one in standalone
//! mode, one per `TransactionRelay` under the operator.

use std::collections::BTreeMap;
use std::sync::RwLock;

use crate::settings::RelayHandle;
use crate::spec::RelayId;

#[derive(Debug, Default)]
pub struct Relays {
    relays: RwLock<BTreeMap<RelayId, RelayHandle>>,
    /// Relays that exist but could not start yet (database down, secret
    /// missing): `/new` answers 503 for them rather than 404.
    starting: RwLock<BTreeMap<RelayId, String>>,
    default: Option<RelayId>,
    /// The process is shutting down: every request is told so (503), not
    /// that its token is unknown once the relays are gone.
    closing: std::sync::atomic::AtomicBool,
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

impl Relays {
    /// `default` is the relay plain `/new` reaches when several are served.
    pub fn new(default: Option<RelayId>) -> Self {
        Self { relays: RwLock::default(), starting: RwLock::default(), default, closing: Default::default() }
    }

    /// Marks the process as shutting down, before its relays are removed.
    pub fn close(&self) {
        self.closing.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn insert(&self, handle: RelayHandle) -> Option<RelayHandle> {
        let id = handle.relay.id().clone();
        self.starting.write().unwrap_or_else(|e| e.into_inner()).remove(&id);
        self.relays.write().unwrap_or_else(|e| e.into_inner()).insert(id, handle)
    }

    pub fn remove(&self, id: &RelayId) -> Option<RelayHandle> {
        self.starting.write().unwrap_or_else(|e| e.into_inner()).remove(id);
        self.relays.write().unwrap_or_else(|e| e.into_inner()).remove(id)
    }

    /// Marks a relay that exists but is not running, with the reason.
    pub fn set_not_ready(&self, id: &RelayId, reason: &str) {
        if !self.relays.read().unwrap_or_else(|e| e.into_inner()).contains_key(id) {
            self.starting.write().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), reason.to_owned());
        }
    }

    /// Forgets a relay that is not running (its resource was deleted).
    pub fn forget_not_ready(&self, keep: impl Fn(&RelayId) -> bool) {
        self.starting.write().unwrap_or_else(|e| e.into_inner()).retain(|id, _| keep(id));
    }

    pub fn get(&self, id: &RelayId) -> Option<RelayHandle> {
        self.relays.read().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Whether any running relay satisfies `check` (without cloning them).
    pub fn any(&self, check: impl Fn(&RelayHandle) -> bool) -> bool {
        self.relays.read().unwrap_or_else(|e| e.into_inner()).values().any(check)
    }

    pub fn all(&self) -> Vec<RelayHandle> {
        self.relays.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.relays.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The named relay, or for the plain paths the default one: the one
    /// named by `--default-relay`, else the only one served.
    pub fn resolve(&self, id: Option<&RelayId>) -> Result<RelayHandle, ResolveError> {
        let relays = self.relays.read().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = id.or(self.default.as_ref()) {
            return relays.get(id).cloned().ok_or_else(|| {
                match self.starting.read().unwrap_or_else(|e| e.into_inner()).get(id) {
                    Some(reason) => ResolveError::NotReady(id.clone(), reason.clone()),
                    None => ResolveError::Unknown(id.clone()),
                }
            });
        }
        let mut all = relays.values();
        match (all.next(), all.next()) {
            (Some(only), None) => Ok(only.clone()),
            (None, _) => Err(ResolveError::None),
            (Some(_), Some(_)) => {
                Err(ResolveError::Ambiguous(relays.keys().map(ToString::to_string).collect::<Vec<_>>().join(", ")))
            }
        }
    }
}
