//! The relays this process serves, by `namespace/name`: one in standalone
//! mode, one per `TransactionRelay` under the operator.

use std::collections::BTreeMap;
use std::sync::RwLock;

use super::RelayId;
use crate::settings::RelayHandle;

#[derive(Debug, Default)]
pub struct Relays {
    relays: RwLock<BTreeMap<RelayId, RelayHandle>>,
    default: Option<RelayId>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no relay {0} is served here")]
    Unknown(RelayId),
    #[error("no relay is served here yet")]
    None,
    #[error("several relays are served here; post to /relays/{{namespace}}/{{name}}/new (one of: {0})")]
    Ambiguous(String),
}

impl Relays {
    /// `default` is the relay plain `/new` reaches when several are served.
    pub fn new(default: Option<RelayId>) -> Self {
        Self { relays: RwLock::default(), default }
    }

    pub fn insert(&self, handle: RelayHandle) -> Option<RelayHandle> {
        let id = handle.relay.id().clone();
        self.relays.write().unwrap_or_else(|e| e.into_inner()).insert(id, handle)
    }

    pub fn remove(&self, id: &RelayId) -> Option<RelayHandle> {
        self.relays.write().unwrap_or_else(|e| e.into_inner()).remove(id)
    }

    pub fn get(&self, id: &RelayId) -> Option<RelayHandle> {
        self.relays.read().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
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
            return relays.get(id).cloned().ok_or_else(|| ResolveError::Unknown(id.clone()));
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
