//! Standalone configuration: a `TransactionRelay` manifest file for the
//! relay's behaviour, the environment for its secrets.

use std::path::Path;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::auth::TokenSet;
use crate::runtime::settings::{QueueSecrets, RelaySettings};
use crate::secret::Secret;
use crate::spec::RelayId;
use crate::spec::{self, TransactionRelay, TransactionRelaySpec};

/// A setting that is missing or wrong, named so the user can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub id: RelayId,
    pub spec: TransactionRelaySpec,
}

impl Manifest {
    /// What runs without `--config`: every default, secrets from the environment.
    pub fn default_relay() -> Self {
        let spec = TransactionRelaySpec::with_defaults(
            spec::DatabaseSpec::new(spec::SecretKeyRef { name: "environment".into(), key: None }, "dapp"),
            spec::QueueSpec {
                secret_ref: spec::SecretRef { name: "environment".into() },
                role_arn: None,
                external_id: None,
            },
        );
        Self { id: RelayId::new("default", "txrelay"), spec }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let field = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(field, e.to_string()))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let value: Value =
            serde_saphyr::from_str(text).map_err(|e| ConfigError::new("manifest", first_line(&e.to_string())))?;
        let expected_api = format!("{}/{}", spec::GROUP, spec::VERSION);
        match value.get("apiVersion").and_then(Value::as_str) {
            Some(api) if api == expected_api => {}
            _ => {
                return Err(ConfigError::new("apiVersion", format!("must be {expected_api}")));
            }
        }
        if value.get("kind").and_then(Value::as_str) != Some("TransactionRelay") {
            return Err(ConfigError::new("kind", "must be TransactionRelay"));
        }
        if let Some(field) = unknown_field(&value, &crd_schema(), "") {
            return Err(ConfigError::new(field, "unknown field"));
        }
        let relay: TransactionRelay = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::new(if path == "." { "manifest".into() } else { path }, first_line(&e.inner().to_string()))
        })?;
        relay.spec.validate().map_err(|e| ConfigError::new(e.field, e.message))?;
        let namespace = relay.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = relay.metadata.name.clone().ok_or_else(|| ConfigError::new("metadata.name", "is required"))?;
        Ok(Self { id: RelayId::new(namespace, name), spec: relay.spec })
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or(text).to_owned()
}

fn crd_schema() -> Value {
    let crd = TransactionRelay::crd();
    crd.spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null)
}

/// The first key of `value` that the CRD schema does not know: a typo in a
/// manifest must not silently fall back to a default.
fn unknown_field(value: &Value, schema: &Value, path: &str) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
    };
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties")?.as_object()?;
            for (key, child) in map {
                if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match properties.get(key) {
                    None => return Some(join(key)),
                    Some(child_schema) => {
                        if let Some(found) = unknown_field(child, child_schema, &join(key)) {
                            return Some(found);
                        }
                    }
                }
            }
            None
        }
        Value::Array(items) => {
            let item_schema = schema.get("items")?;
            items.iter().enumerate().find_map(|(i, item)| unknown_field(item, item_schema, &format!("{path}[{i}]")))
        }
        _ => None,
    }
}

/// Reads a variable; tests pass their own lookup instead of the process
/// environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name).filter(|v| !v.is_empty())
    }
}

pub fn database_url(env: &dyn Env) -> Result<Secret, ConfigError> {
    env.var("DATABASE_URL").map(Secret::new).ok_or_else(|| ConfigError::new("DATABASE_URL", "is not set"))
}

pub fn queue_secrets(env: &dyn Env) -> Result<QueueSecrets, ConfigError> {
    let queue_url = env.var("SQS_QUEUE_URL").ok_or_else(|| ConfigError::new("SQS_QUEUE_URL", "is not set"))?;
    let region = env
        .var("AWS_REGION")
        .or_else(|| env.var("AWS_DEFAULT_REGION"))
        .ok_or_else(|| ConfigError::new("AWS_REGION", "is not set"))?;
    let access_key_id = env.var("AWS_ACCESS_KEY_ID");
    let secret_access_key = env.var("AWS_SECRET_ACCESS_KEY").map(Secret::new);
    if access_key_id.is_some() != secret_access_key.is_some() {
        return Err(ConfigError::new(
            "AWS_ACCESS_KEY_ID",
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together",
        ));
    }
    Ok(QueueSecrets {
        queue_url,
        region,
        endpoint_url: env.var("AWS_ENDPOINT_URL"),
        sts_endpoint_url: env.var("AWS_ENDPOINT_URL_STS"),
        access_key_id,
        secret_access_key,
        ledger_token: env.var("LEDGER_TOKEN").map(Secret::new),
    })
}

/// Settings for `txrelay run` and the CLI commands that send.
pub fn relay_settings(manifest: &Manifest, env: &dyn Env) -> Result<RelaySettings, ConfigError> {
    Ok(RelaySettings {
        id: manifest.id.clone(),
        spec: manifest.spec.clone(),
        database_url: database_url(env)?,
        queue: queue_secrets(env)?,
        ingest_tokens: TokenSet::parse(&env.var("RELAY_API_TOKENS").unwrap_or_default()),
        admin_tokens: TokenSet::parse(&env.var("RELAY_ADMIN_TOKENS").unwrap_or_default()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
apiVersion: relay.mykobo.io/v1alpha1
kind: TransactionRelay
metadata: {name: dapp, namespace: payments}
spec:
  retryInterval: 5m
  batchSize: 100
  maxAttempts: 20
  delaySeconds: 0
  suspend: false
  unsentWarningThreshold: 100
  database: {secretRef: {name: dapp-db, key: url}, schema: dapp}
  queue: {secretRef: {name: dapp-sqs}}
"#;

    #[test]
    fn parses_the_documented_manifest() {
        let manifest = Manifest::parse(MANIFEST).unwrap();
        assert_eq!(manifest.id.to_string(), "payments/dapp");
        assert_eq!(manifest.spec.batch_size, 100);
        assert_eq!(manifest.spec.retry_interval.to_string(), "5m");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (MANIFEST.replace("batchSize: 100", "batchSize: 0"), "spec.batchSize"),
            (MANIFEST.replace("batchSize: 100", "batchSize: lots"), "spec.batchSize"),
            (MANIFEST.replace("retryInterval: 5m", "retryInterval: 5 minutes"), "spec.retryInterval"),
            (MANIFEST.replace("retryInterval: 5m", "retryIntervall: 5m"), "spec.retryIntervall"),
            (MANIFEST.replace("delaySeconds: 0", "delaySeconds: 901"), "spec.delaySeconds"),
            (MANIFEST.replace("schema: dapp", "schema: \"Dapp; DROP\""), "spec.database.schema"),
            (MANIFEST.replace("  queue: {secretRef: {name: dapp-sqs}}\n", ""), "spec"),
            (MANIFEST.replace("kind: TransactionRelay", "kind: Deployment"), "kind"),
            (
                MANIFEST.replace("metadata: {name: dapp, namespace: payments}", "metadata: {namespace: payments}"),
                "metadata.name",
            ),
        ];
        for (text, field) in cases {
            let error = Manifest::parse(&text).unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(!error.to_string().contains('\n'), "one line: {error}");
        }
    }

    #[test]
    fn environment_settings_are_required_and_named() {
        let env = |name: &str| match name {
            "DATABASE_URL" => Some("postgres://u:hunter2@h/db".to_owned()),
            "SQS_QUEUE_URL" => Some("http://localhost/q".to_owned()),
            _ => None,
        };
        let error = relay_settings(&Manifest::default_relay(), &env).unwrap_err();
        assert_eq!(error.field, "AWS_REGION");
        let no_db = |_: &str| None;
        assert_eq!(database_url(&no_db).unwrap_err().field, "DATABASE_URL");
        let with_region = |name: &str| env(name).or_else(|| (name == "AWS_REGION").then(|| "eu-west-1".to_owned()));
        let settings = relay_settings(&Manifest::default_relay(), &with_region).unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
    }
}
