//! The `TransactionRelay` resource: what a relay is asked to do. Both the
//! standalone `txrelay run` (from a manifest file) and the operator (from the
//! cluster) read these types, so they depend on neither.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;

pub const GROUP: &str = "relay.mykobo.io";
pub const VERSION: &str = "v1alpha1";
pub const MAX_BATCH_SIZE: u32 = 1000;
pub const MAX_DELAY_SECONDS: u32 = 900;
pub const MAX_CONCURRENCY: u32 = 64;
/// The schema name doubles as a notification channel suffix and a
/// `search_path` value, so it is restricted to a plain lower-case identifier.
pub const SCHEMA_NAME_PATTERN: &str = "^[a-z_][a-z0-9_]{0,62}$";

/// Relays ledger transactions from a PostgreSQL outbox table to an SQS queue.
// Several printer columns share a type; clippy reads that as a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "relay.mykobo.io",
    version = "v1alpha1",
    kind = "TransactionRelay",
    namespaced,
    shortname = "txr",
    category = "txrelay",
    status = "TransactionRelayStatus",
    doc = "Relays ledger transactions from a PostgreSQL outbox table to an SQS queue",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why the relay is or is not ready"
    ),
    printcolumn(name = "Unsent", type_ = "integer", json_path = ".status.unsent"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(
        name = "Oldest",
        type_ = "date",
        json_path = ".status.oldestUnsentTime",
        description = "How long the oldest unsent transaction has waited"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Last Error",
        type_ = "string",
        json_path = ".status.lastError",
        priority = 1,
        description = "The last error the relay met (kubectl get -o wide)"
    )
)]
#[serde(rename_all = "camelCase")]
// The cross-field limits of `validate()`, enforced by the API server too. CEL's
// `duration()` knows no `d` unit; a duration with days is longer than any
// limit here, so it passes the first rule and is refused as an inline send
// timeout (the operator's own check still applies in full).
#[x_kube(validation = Rule::new(
    "self.claimLease.contains('d') || duration(self.claimLease) >= duration('5s')"
).message("spec.claimLease must be at least 5s: each call to the queue gets a third of it (1-10s) and must end before the claim does").reason(Reason::FieldValueInvalid).field_path(".claimLease"))]
#[x_kube(validation = Rule::new(
    "!self.inlineSendTimeout.contains('d') && duration(self.inlineSendTimeout) > duration('0s') && (self.claimLease.contains('d') || duration(self.inlineSendTimeout) + duration(self.inlineSendTimeout) < duration(self.claimLease))"
).message("spec.inlineSendTimeout must be longer than 0s and shorter than half of spec.claimLease").reason(Reason::FieldValueInvalid).field_path(".inlineSendTimeout"))]
pub struct TransactionRelaySpec {
    /// Longest sleep between two sweeps, and the cap of the retry backoff.
    #[serde(default = "defaults::retry_interval")]
    // Durations the operator can read (more digits overflow, and one object
    // it cannot read stops its watch of every relay), bounded for CEL's cost.
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]{1,9}(ms|s|m|h|d)){1,5}$')").message("at most 5 parts of at most 9 digits each, such as 90s or 1h30m"))]
    pub retry_interval: HumanDuration,
    /// Rows claimed per sweep.
    #[serde(default = "defaults::batch_size")]
    #[schemars(range(min = 1, max = 1000))]
    // Integer formats the API server knows: it warns about `uint32` on every apply.
    #[schemars(extend("format" = "int32"))]
    pub batch_size: u32,
    /// Failed sends before a row is dead-lettered; 0 retries for ever.
    #[serde(default = "defaults::max_attempts")]
    #[schemars(range(max = u32::MAX))]
    #[schemars(extend("format" = "int64"))]
    pub max_attempts: u32,
    /// SQS `DelaySeconds` of every message (standard queues only).
    #[serde(default)]
    #[schemars(range(min = 0, max = 900))]
    #[schemars(extend("format" = "int32"))]
    pub delay_seconds: u32,
    /// Accept and store transactions, but send nothing.
    #[serde(default)]
    pub suspend: bool,
    /// `/health/transactions` reports `warning` from this many unsent rows on.
    #[serde(default = "defaults::unsent_warning_threshold")]
    #[schemars(extend("format" = "int64"))]
    pub unsent_warning_threshold: u64,
    /// How long a sweep holds the rows it claimed before another process may take them.
    #[serde(default = "defaults::claim_lease")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]{1,9}(ms|s|m|h|d)){1,5}$')").message("at most 5 parts of at most 9 digits each, such as 90s or 1h30m"))]
    pub claim_lease: HumanDuration,
    /// `SendMessageBatch` calls in flight per sweep.
    #[serde(default = "defaults::concurrency")]
    #[schemars(range(min = 1, max = 64))]
    #[schemars(extend("format" = "int32"))]
    pub concurrency: u32,
    /// How long `/new` waits for the inline send before answering 202.
    #[serde(default = "defaults::inline_send_timeout")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]{1,9}(ms|s|m|h|d)){1,5}$')").message("at most 5 parts of at most 9 digits each, such as 90s or 1h30m"))]
    pub inline_send_timeout: HumanDuration,
    /// Delete sent rows older than this; unset keeps every row. Checked at
    /// most every 10 minutes, after a sweep (so not while suspended), in
    /// batches of 500; unsent and dead-lettered rows are never deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]{1,9}(ms|s|m|h|d)){1,5}$')").message("at most 5 parts of at most 9 digits each, such as 90s or 1h30m"))]
    pub retention: Option<HumanDuration>,
    /// How long an idempotency key is recognised after its transaction was
    /// created, also after retention deleted the row (a compact record of
    /// the key, its body digest and message id is kept): a replay within it
    /// is answered 200 or 409, never sent twice. At least `retention`.
    #[serde(default = "defaults::idempotency_window")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]{1,9}(ms|s|m|h|d)){1,5}$')").message("at most 5 parts of at most 9 digits each, such as 90s or 1h30m"))]
    pub idempotency_window: HumanDuration,
    pub database: DatabaseSpec,
    pub queue: QueueSpec,
    /// Bearer tokens accepted on `/new`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<TokenSpec>,
    /// Bearer tokens accepted on the read endpoints (`GET /transactions...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<TokenSpec>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Secret holding the PostgreSQL URL.
    pub secret_ref: SecretKeyRef,
    /// PostgreSQL schema of the `transactions` table.
    #[serde(default = "defaults::schema")]
    #[schemars(regex(pattern = "^[a-z_][a-z0-9_]{0,62}$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.database.schema is immutable: the relay's rows live in it; create a new TransactionRelay to use another schema"))]
    pub schema: String,
    /// Apply pending migrations when the relay starts. `false` for teams that
    /// run `txrelay migrate` as a separate job: the relay then only checks
    /// that the database answers.
    #[serde(default = "defaults::migrate")]
    pub migrate: bool,
    /// The statement timeout of a migration (requests have 10 s). Each
    /// statement also waits at most 5 s for a lock, and is retried until this
    /// much time has passed, so a migration never queues every writer behind
    /// a long transaction.
    #[serde(default = "defaults::migration_timeout")]
    pub migration_timeout: HumanDuration,
}

impl DatabaseSpec {
    /// A database spec with the defaults.
    pub fn new(secret_ref: SecretKeyRef, schema: impl Into<String>) -> Self {
        Self {
            secret_ref,
            schema: schema.into(),
            migrate: defaults::migrate(),
            migration_timeout: defaults::migration_timeout(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Secret with the keys queueUrl, region and optionally endpointUrl,
    /// stsEndpointUrl, accessKeyId, secretAccessKey and ledgerToken.
    pub secret_ref: SecretRef,
    /// An IAM role this relay assumes (STS AssumeRole) from the operator's
    /// own identity (IRSA / web identity, EKS Pod Identity, or the Secret's
    /// keys) to send to its queue; refreshed before it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}$"))]
    pub role_arn: Option<String>,
    /// The external id the role's trust policy requires, if any (only
    /// with `roleArn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 1224), regex(pattern = r"^[\w+=,.@:/-]+$"))]
    pub external_id: Option<String>,
}

/// `spec.queue.roleArn`: an IAM role ARN (what STS AssumeRole takes).
pub fn is_role_arn(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("arn:aws") else { return false };
    let Some((partition, rest)) = rest.split_once(":iam::") else { return false };
    let Some((account, path)) = rest.split_once(":role/") else { return false };
    partition.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && (1..=512).contains(&path.len())
        && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+=,.@/-".contains(&b))
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenSpec {
    /// Secret whose key holds one or more tokens, separated by commas or new lines.
    pub token_secret_ref: SecretKeyRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretRef {
    #[schemars(length(min = 1))]
    pub name: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key inside the Secret; `url` for databases, `tokens` for token lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl SecretKeyRef {
    pub fn key_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.key.as_deref().unwrap_or(default)
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransactionRelayStatus {
    /// The generation of the spec the running relay was built from; an edit
    /// the operator could not apply leaves it behind `metadata.generation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `DatabaseReachable` and `QueueReachable`, each with a reason
    /// (listed under "Condition reasons" in docs/reference/crd.md).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Transactions stored and not yet sent (neither sent nor dead-lettered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsent: Option<i64>,
    /// Dead-lettered transactions not skipped: `kubectl txr retry-all
    /// --dead-only` resends them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<i64>,
    /// Age of the oldest unsent transaction when the status was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unsent_age_seconds: Option<i64>,
    /// When the oldest unsent transaction was created (absent when none
    /// waits): `kubectl get` shows it as a duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unsent_time: Option<Time>,
    /// When the relay loop last finished a sweep (written at most once a
    /// minute while nothing else changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sweep_time: Option<Time>,
    /// Why the last reconcile, or the last call to the database or queue,
    /// failed; absent once it succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

mod defaults {
    use crate::duration::HumanDuration;

    pub fn retry_interval() -> HumanDuration {
        HumanDuration::from_secs(300)
    }
    pub fn batch_size() -> u32 {
        100
    }
    pub fn max_attempts() -> u32 {
        20
    }
    pub fn unsent_warning_threshold() -> u64 {
        100
    }
    pub fn claim_lease() -> HumanDuration {
        HumanDuration::from_secs(60)
    }
    pub fn concurrency() -> u32 {
        4
    }
    pub fn inline_send_timeout() -> HumanDuration {
        HumanDuration::from_secs(2)
    }
    pub fn migrate() -> bool {
        true
    }
    pub fn migration_timeout() -> HumanDuration {
        HumanDuration::from_secs(15 * 60)
    }
    pub fn idempotency_window() -> HumanDuration {
        HumanDuration::from_secs(30 * 86_400)
    }
    pub fn schema() -> String {
        "dapp".to_owned()
    }
}

/// A spec value outside what the relay accepts, named by its path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

impl TransactionRelaySpec {
    /// A spec with every default, reading its secrets from the given refs.
    pub fn with_defaults(database: DatabaseSpec, queue: QueueSpec) -> Self {
        Self {
            retry_interval: defaults::retry_interval(),
            batch_size: defaults::batch_size(),
            max_attempts: defaults::max_attempts(),
            delay_seconds: 0,
            suspend: false,
            unsent_warning_threshold: defaults::unsent_warning_threshold(),
            claim_lease: defaults::claim_lease(),
            concurrency: defaults::concurrency(),
            inline_send_timeout: defaults::inline_send_timeout(),
            retention: None,
            idempotency_window: defaults::idempotency_window(),
            database,
            queue,
            ingest: None,
            admin: None,
        }
    }

    /// The same limits as the CRD schema, for manifests that never went
    /// through an API server (standalone `txrelay run`).
    pub fn validate(&self) -> Result<(), SpecError> {
        let fail = |field, message: String| Err(SpecError { field, message });
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return fail("spec.batchSize", format!("must be between 1 and {MAX_BATCH_SIZE}, got {}", self.batch_size));
        }
        if self.delay_seconds > MAX_DELAY_SECONDS {
            return fail(
                "spec.delaySeconds",
                format!("must be between 0 and {MAX_DELAY_SECONDS}, got {}", self.delay_seconds),
            );
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return fail(
                "spec.concurrency",
                format!("must be between 1 and {MAX_CONCURRENCY}, got {}", self.concurrency),
            );
        }
        if self.retry_interval.get().is_zero() {
            return fail("spec.retryInterval", "must be longer than 0s".into());
        }
        if self.claim_lease.get() < std::time::Duration::from_secs(5) {
            return fail("spec.claimLease", "must be at least 5s".into());
        }
        if self.inline_send_timeout.get().is_zero() || self.inline_send_timeout.get() * 2 >= self.claim_lease.get() {
            return fail(
                "spec.inlineSendTimeout",
                "must be longer than 0s and shorter than half of spec.claimLease".into(),
            );
        }
        if self.retention.is_some_and(|r| r.get() < std::time::Duration::from_secs(3600)) {
            return fail("spec.retention", "must be at least 1h".into());
        }
        if self.idempotency_window.get() < std::time::Duration::from_secs(3600)
            || self.retention.is_some_and(|r| self.idempotency_window.get() < r.get())
        {
            return fail(
                "spec.idempotencyWindow",
                "must be at least 1h and no shorter than spec.retention (the window counts from a row's creation: \
                 a replay within it is recognised even after retention deleted the row)"
                    .into(),
            );
        }
        if !is_schema_name(&self.database.schema) {
            return fail(
                "spec.database.schema",
                format!("must match {SCHEMA_NAME_PATTERN} (a lower-case PostgreSQL identifier)"),
            );
        }
        if self.database.secret_ref.name.is_empty() {
            return fail("spec.database.secretRef.name", "must not be empty".into());
        }
        if self.queue.secret_ref.name.is_empty() {
            return fail("spec.queue.secretRef.name", "must not be empty".into());
        }
        if self.queue.role_arn.as_deref().is_some_and(|arn| !is_role_arn(arn)) {
            return fail("spec.queue.roleArn", "must be an IAM role ARN, arn:aws:iam::ACCOUNT:role/NAME".into());
        }
        if let Some(id) = &self.queue.external_id {
            if self.queue.role_arn.is_none() {
                return fail("spec.queue.externalId", "needs spec.queue.roleArn".into());
            }
            let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_+=,.@:/-".contains(&b);
            if !(2..=1224).contains(&id.len()) || !id.bytes().all(allowed) {
                return fail(
                    "spec.queue.externalId",
                    "must be 2-1224 characters of letters, digits and _+=,.@:/-".into(),
                );
            }
        }
        Ok(())
    }
}

pub fn is_schema_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && name.len() <= 63
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

/// What kind of SQS queue a relay sends to, read once from its URL: a FIFO
/// queue keeps each wallet's order, so its claims and intake do too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QueueKind {
    #[default]
    Standard,
    Fifo,
}

impl QueueKind {
    /// SQS names every FIFO queue, and only those, with `.fifo` at the end.
    pub fn of_url(queue_url: &str) -> Self {
        if queue_url.ends_with(".fifo") { Self::Fifo } else { Self::Standard }
    }

    pub fn is_fifo(self) -> bool {
        self == Self::Fifo
    }
}

/// `namespace/name` of a `TransactionRelay`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId {
    pub namespace: String,
    pub name: String,
}

impl RelayId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl std::str::FromStr for RelayId {
    type Err = String;

    /// `NAMESPACE/NAME`, each a DNS-1123 label or subdomain (lowercase
    /// letters, digits, '-' and '.'): the one parser for every flag that
    /// names a relay (`--relay`, `--default-relay`, the plugin's argument).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 253
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        match text.split_once('/') {
            Some((namespace, name)) if valid(namespace) && valid(name) => Ok(Self::new(namespace, name)),
            _ => Err(format!("expected NAMESPACE/NAME of a TransactionRelay, got {text:?}")),
        }
    }
}

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> TransactionRelaySpec {
        serde_json::from_value(serde_json::json!({
            "database": {"secretRef": {"name": "db"}},
            "queue": {"secretRef": {"name": "sqs"}},
        }))
        .unwrap()
    }

    #[test]
    fn defaults_follow_the_documented_values() {
        let spec = minimal();
        assert_eq!(
            spec,
            TransactionRelaySpec::with_defaults(
                DatabaseSpec::new(SecretKeyRef { name: "db".into(), key: None }, "dapp"),
                QueueSpec { secret_ref: SecretRef { name: "sqs".into() }, role_arn: None, external_id: None },
            )
        );
        assert_eq!(spec.retry_interval, HumanDuration::from_secs(300));
        assert_eq!(spec.batch_size, 100);
        assert_eq!(spec.max_attempts, 20);
        assert_eq!(spec.delay_seconds, 0);
        assert!(!spec.suspend);
        assert_eq!(spec.unsent_warning_threshold, 100);
        assert_eq!(spec.claim_lease, HumanDuration::from_secs(60));
        assert_eq!(spec.concurrency, 4);
        assert_eq!(spec.inline_send_timeout, HumanDuration::from_secs(2));
        assert_eq!(spec.retention, None);
        assert_eq!(spec.database.schema, "dapp");
        assert_eq!(spec.database.secret_ref.key_or("url"), "url");
        spec.validate().unwrap();
    }

    #[test]
    fn validation_names_the_field_at_fault() {
        type Case = (fn(&mut TransactionRelaySpec), &'static str);
        let cases: [Case; 6] = [
            (|s| s.batch_size = 0, "spec.batchSize"),
            (|s| s.batch_size = 1001, "spec.batchSize"),
            (|s| s.delay_seconds = 901, "spec.delaySeconds"),
            (|s| s.concurrency = 0, "spec.concurrency"),
            (|s| s.database.schema = "Robert'); DROP".into(), "spec.database.schema"),
            (|s| s.inline_send_timeout = HumanDuration::from_secs(40), "spec.inlineSendTimeout"),
        ];
        for (mutate, field) in cases {
            let mut spec = minimal();
            mutate(&mut spec);
            assert_eq!(spec.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(is_schema_name("dapp"));
        assert!(is_schema_name("_t1"));
        assert!(!is_schema_name("1abc"));
        assert!(!is_schema_name("Dapp"));
        assert!(!is_schema_name("a-b"));
        assert!(!is_schema_name(""));
        assert!(!is_schema_name(&"a".repeat(64)));
    }
}
