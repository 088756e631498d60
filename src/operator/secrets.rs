//! Turns a `TransactionRelay` and the Secrets it names into [`RelaySettings`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::{Api, Client, ResourceExt};

use super::Error;
use crate::auth::TokenSet;
use crate::runtime::settings::{QueueSecrets, RelaySettings};
use crate::secret::Secret;
use crate::spec::RelayId;
use crate::spec::{SecretKeyRef, TransactionRelay};

pub struct SecretReader {
    api: Api<KubeSecret>,
    namespace: String,
}

impl SecretReader {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self { api: Api::namespaced(client, namespace), namespace: namespace.to_owned() }
    }

    async fn data(&self, name: &str) -> Result<BTreeMap<String, String>, Error> {
        let secret = self
            .api
            .get_opt(name)
            .await
            .map_err(|error| Error::reading("secrets", &self.namespace, name, error))?
            .ok_or_else(|| Error::SecretNotFound(name.into()))?;
        let mut data: BTreeMap<String, String> = secret.string_data.unwrap_or_default();
        for (key, value) in secret.data.unwrap_or_default() {
            let text = String::from_utf8(value.0).map_err(|_| Error::SecretKeyInvalid(name.into(), key.clone()))?;
            data.insert(key, text);
        }
        Ok(data)
    }

    async fn key(&self, reference: &SecretKeyRef, default_key: &str) -> Result<String, Error> {
        let key = reference.key_or(default_key);
        let mut data = self.data(&reference.name).await?;
        data.remove(key)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::SecretKeyMissing(reference.name.clone(), key.into()))
    }

    /// The tokens of a Secret key (none when the spec names no Secret).
    pub async fn tokens(&self, reference: Option<&SecretKeyRef>) -> Result<TokenSet, Error> {
        match reference {
            Some(reference) => Ok(TokenSet::parse(&self.key(reference, "tokens").await?)),
            None => Ok(TokenSet::default()),
        }
    }

    /// Everything a relay needs, read fresh from the API server, with the
    /// tokens already read (they are read first and on their own).
    pub async fn settings(
        &self,
        relay: &TransactionRelay,
        ingest_tokens: TokenSet,
        admin_tokens: TokenSet,
    ) -> Result<RelaySettings, Error> {
        let spec = &relay.spec;
        spec.validate().map_err(Error::InvalidSpec)?;
        let database_url = self.key(&spec.database.secret_ref, "url").await?;
        let queue_name = &spec.queue.secret_ref.name;
        let mut queue = self.data(queue_name).await?;
        let mut required = |key: &str| {
            queue
                .remove(key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| Error::SecretKeyMissing(queue_name.clone(), key.into()))
        };
        let queue_url = required("queueUrl")?;
        let region = required("region")?;
        let optional = |queue: &mut BTreeMap<String, String>, key: &str| {
            queue.remove(key).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
        };
        let queue = QueueSecrets {
            queue_url,
            region,
            endpoint_url: optional(&mut queue, "endpointUrl"),
            sts_endpoint_url: optional(&mut queue, "stsEndpointUrl"),
            access_key_id: optional(&mut queue, "accessKeyId"),
            secret_access_key: optional(&mut queue, "secretAccessKey").map(Secret::new),
            ledger_token: optional(&mut queue, "ledgerToken").map(Secret::new),
        };
        Ok(RelaySettings {
            id: RelayId::new(relay.namespace().unwrap_or_default(), relay.name_any()),
            spec: spec.clone(),
            database_url: Secret::new(database_url),
            queue,
            ingest_tokens,
            admin_tokens,
        })
    }
}

/// A relay as the cluster runs it, for the administrative commands
/// (`--relay NAMESPACE/NAME`): its resource and every Secret it references,
/// read through the API server with the caller's own permissions. No
/// tokens unless asked (`doctor`): the other commands serve no HTTP.
pub async fn resolve(client: Client, namespace: &str, name: &str, with_tokens: bool) -> Result<RelaySettings, Error> {
    let relays: Api<TransactionRelay> = Api::namespaced(client.clone(), namespace);
    let relay = relays
        .get_opt(name)
        .await
        .map_err(|error| Error::reading("transactionrelays", namespace, name, error))?
        .ok_or_else(|| Error::RelayNotFound(format!("{namespace}/{name}")))?;
    let reader = SecretReader::new(client, namespace);
    let (ingest, admin) = if with_tokens {
        let spec = &relay.spec;
        (
            reader.tokens(spec.ingest.as_ref().map(|i| &i.token_secret_ref)).await?,
            reader.tokens(spec.admin.as_ref().map(|a| &a.token_secret_ref)).await?,
        )
    } else {
        (TokenSet::default(), TokenSet::default())
    };
    reader.settings(&relay, ingest, admin).await
}
