//! Everything needed to start one relay, resolved from wherever it came
//! from: the environment (standalone) or Kubernetes Secrets (operator).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::auth::TokenSet;
use crate::metrics::Metrics;
use crate::queue::sqs::{SqsQueue, SqsSettings};
use crate::relay::{Relay, RelayConfig};
use crate::secret::Secret;
use crate::spec::RelayId;
use crate::spec::TransactionRelaySpec;
use crate::store::{Store, StoreOptions};

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub id: RelayId,
    pub spec: TransactionRelaySpec,
    pub database_url: Secret,
    pub queue: QueueSecrets,
    pub ingest_tokens: TokenSet,
    pub admin_tokens: TokenSet,
}

/// The queue Secret's keys (or their environment variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSecrets {
    pub queue_url: String,
    pub region: String,
    pub endpoint_url: Option<String>,
    /// Where STS is asked for `spec.queue.roleArn` (default: AWS's own STS
    /// endpoint for the region, never the SQS endpoint above).
    pub sts_endpoint_url: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub ledger_token: Option<Secret>,
}

/// An STS session name for the relay: `txrelay-NAMESPACE-NAME`, in the
/// characters and length STS allows (2-64 of `[\w+=,.@-]`).
fn session_name(id: &RelayId) -> String {
    let name: String = format!("txrelay-{}-{}", id.namespace, id.name)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) { c } else { '-' })
        .take(64)
        .collect();
    name
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("queue: {0}")]
    Queue(#[from] crate::queue::sqs::SqsConfigError),
    #[error("the process is stopping")]
    Stopping,
}

/// One relay, ready to serve: its store (lazily connected), queue client and
/// tokens.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    pub relay: Arc<Relay>,
    pub ingest_tokens: TokenSet,
    pub admin_tokens: TokenSet,
    /// `/new` needs a token (tokens are configured, or the spec names their
    /// Secret): `--insecure-no-auth` never opens such a relay, not even
    /// while its tokens are revoked.
    pub ingest_required: bool,
}

impl RelaySettings {
    /// A digest of everything that, when changed, means the relay must be
    /// rebuilt: the spec and every secret value but the tokens, which are
    /// applied to the running relay as they are (a rotation or a revocation
    /// must never wait on a rebuild that may fail). Never printed.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(&self.spec).unwrap_or_default().hash(&mut hasher);
        self.database_url.expose().hash(&mut hasher);
        let q = &self.queue;
        (&q.queue_url, &q.region, &q.endpoint_url, &q.sts_endpoint_url, &q.access_key_id).hash(&mut hasher);
        q.secret_access_key.as_ref().map(Secret::expose).hash(&mut hasher);
        q.ledger_token.as_ref().map(Secret::expose).hash(&mut hasher);
        hasher.finish()
    }

    /// How to reach the relay's database, with a main pool of `pool_size`.
    pub fn store_options(&self, pool_size: u32) -> StoreOptions {
        let mut options = StoreOptions::new(self.database_url.clone(), self.spec.database.schema.clone());
        options.max_connections = pool_size;
        options.migration_timeout = self.spec.database.migration_timeout.get();
        options
    }

    pub fn sqs_settings(&self) -> SqsSettings {
        let config = RelayConfig::from(&self.spec);
        SqsSettings {
            queue_url: self.queue.queue_url.clone(),
            region: self.queue.region.clone(),
            endpoint_url: self.queue.endpoint_url.clone(),
            sts_endpoint_url: self.queue.sts_endpoint_url.clone(),
            access_key_id: self.queue.access_key_id.clone(),
            secret_access_key: self.queue.secret_access_key.clone(),
            role_arn: self.spec.queue.role_arn.clone(),
            external_id: self.spec.queue.external_id.clone(),
            session_name: session_name(&self.id),
            delay_seconds: self.spec.delay_seconds,
            // Well inside the claim lease, and no longer than the default shutdown grace period.
            call_timeout: config.call_timeout(),
        }
    }

    /// Builds the relay without touching the network: a relay whose
    /// database is down still starts, reports it, and recovers.
    pub async fn build(&self, metrics: &Metrics, pool_size: u32) -> Result<RelayHandle, StartError> {
        let store = Store::connect_lazy(&self.store_options(pool_size))?;
        let queue = SqsQueue::new(&self.sqs_settings()).await?;
        let relay = Relay::new(
            self.id.clone(),
            RelayConfig::from(&self.spec),
            store,
            Arc::new(queue),
            self.queue.ledger_token.clone(),
            metrics.relay(&self.id.to_string()),
        );
        Ok(RelayHandle {
            relay: Arc::new(relay),
            ingest_tokens: self.ingest_tokens.clone(),
            admin_tokens: self.admin_tokens.clone(),
            ingest_required: self.spec.ingest.is_some() || !self.ingest_tokens.is_empty(),
        })
    }
}
