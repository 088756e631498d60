//! Relays as a cluster runs them: `--relay NAMESPACE/NAME` reads the
//! `TransactionRelay` and the Secrets it references through the Kubernetes
//! API, with the caller's own permissions, and `get` lists relays. Secret
//! values go straight into [`RelaySettings`], whose secrets are redacted by
//! type; nothing here prints or logs them.

use std::ffi::OsString;
use std::str::FromStr;

use chrono::Utc;
use clap::Args;
use kube::config::KubeConfigOptions;
use kube::{Api, Client, Config, ResourceExt};

use super::CliError;
use crate::runtime::config::ConfigError;
use crate::runtime::settings::RelaySettings;
use crate::spec::{RelayId, TransactionRelay};

/// The bound on each Kubernetes API call of a command.
const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// A client for the kubeconfig's current context (or `context`), honouring
/// `KUBECONFIG`; inside a pod without a kubeconfig, its service account.
pub async fn client(context: Option<&str>) -> Result<Client, CliError> {
    let config = match context {
        Some(context) => {
            let options = KubeConfigOptions { context: Some(context.to_owned()), ..KubeConfigOptions::default() };
            Config::from_kubeconfig(&options)
                .await
                .map_err(|error| ConfigError::new("--context", format!("cannot use context {context:?}: {error}")))?
        }
        None => Config::infer().await.map_err(|error| {
            ConfigError::new("--relay", format!("no Kubernetes configuration (kubeconfig or in-cluster): {error}"))
        })?,
    };
    let mut config = config;
    // kube bounds connecting only: an API server (or a proxy before it) that
    // accepts and never answers would hold the command forever.
    config.read_timeout = Some(API_TIMEOUT);
    config.write_timeout = Some(API_TIMEOUT);
    config.connect_timeout = Some(API_TIMEOUT);
    Client::try_from(config).map_err(|error| CliError::failed(format!("cannot build a Kubernetes client: {error}")))
}

/// Everything `relay` needs, read from the cluster: as a manifest plus
/// environment would give it.
pub async fn settings(relay: &RelayId, context: Option<&str>) -> Result<RelaySettings, CliError> {
    resolve(relay, context, false).await
}

/// As [`settings`], with the ingest and admin tokens too (`doctor`).
pub async fn settings_with_tokens(relay: &RelayId, context: Option<&str>) -> Result<RelaySettings, CliError> {
    resolve(relay, context, true).await
}

async fn resolve(relay: &RelayId, context: Option<&str>, with_tokens: bool) -> Result<RelaySettings, CliError> {
    let client = client(context).await?;
    crate::operator::resolve(client, &relay.namespace, &relay.name, with_tokens).await.map_err(|error| {
        use crate::operator::Error;
        match &error {
            // The API server could not be reached, or failed or throttled:
            // worth a retry (exit 1). Any other refusal is the setup's.
            Error::Kube(kube::Error::Api(status)) if status.code >= 500 || status.code == 429 => {
                CliError::failed(format!("--relay {relay}: {error}"))
            }
            Error::Kube(kube::Error::Api(_)) => CliError::Config(ConfigError::new("--relay", error.to_string())),
            Error::Kube(_) => CliError::failed(format!("--relay {relay}: {error}")),
            // Missing, forbidden or invalid: the setup is wrong.
            _ => CliError::Config(ConfigError::new(format!("--relay {relay}"), error.to_string())),
        }
    })
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Namespace to list (default: the kubeconfig context's).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
}

/// `get`: relays with the CRD's printer columns and the last error.
pub async fn get(context: Option<&str>, args: GetArgs) -> Result<(), CliError> {
    let client = client(context).await?;
    let namespace = args.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
    let api: Api<TransactionRelay> =
        if args.all_namespaces { Api::all(client) } else { Api::namespaced(client, &namespace) };
    let scope = if args.all_namespaces { "all namespaces".to_owned() } else { format!("namespace {namespace}") };
    let relays = api.list(&Default::default()).await.map_err(|error| match &error {
        kube::Error::Api(status) if status.code == 403 => {
            CliError::Config(ConfigError::new("get", format!("cannot list transactionrelays in {scope}: forbidden")))
        }
        kube::Error::Api(status) if status.code < 500 && status.code != 429 => {
            CliError::Config(ConfigError::new("get", format!("cannot list transactionrelays in {scope}: {error}")))
        }
        _ => CliError::failed(format!("cannot list transactionrelays in {scope}: {error}")),
    })?;
    if relays.items.is_empty() {
        println!("no TransactionRelays in {scope}");
        return Ok(());
    }
    print!("{}", relay_table(&relays.items, args.all_namespaces, Utc::now()));
    Ok(())
}

/// The table `get` prints, columns padded to their widest cell.
fn relay_table(relays: &[TransactionRelay], with_namespace: bool, now: chrono::DateTime<Utc>) -> String {
    let mut rows = vec![
        ["NAMESPACE", "NAME", "READY", "UNSENT", "FAILED", "OLDEST", "AGE", "LAST ERROR"].map(str::to_owned).to_vec(),
    ];
    for relay in relays {
        let status = relay.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == crate::operator::READY)
            .map_or("Unknown".to_owned(), |c| c.status.clone());
        let number = |n: Option<i64>| n.map_or("-".to_owned(), |n| n.to_string());
        let age = relay.metadata.creation_timestamp.as_ref().map_or("-".to_owned(), |t| {
            let created = chrono::DateTime::<Utc>::from_timestamp(t.0.as_second(), 0).unwrap_or(now);
            short_age(now - created)
        });
        rows.push(vec![
            relay.namespace().unwrap_or_default(),
            relay.name_any(),
            ready,
            number(status.unsent),
            number(status.failed),
            status.oldest_unsent_age_seconds.map_or("-".to_owned(), |s| short_age(chrono::Duration::seconds(s))),
            age,
            status.last_error.unwrap_or_default().replace('\n', " "),
        ]);
    }
    let skip = usize::from(!with_namespace);
    let widths: Vec<usize> =
        (0..8).map(|column| rows.iter().map(|row| row[column].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> =
            (skip..8).map(|c| if c == 7 { row[c].clone() } else { format!("{:<w$}", row[c], w = widths[c]) }).collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// An age as kubectl prints it: 45s, 12m, 5h, 3d.
pub(super) fn short_age(age: chrono::Duration) -> String {
    let seconds = age.num_seconds().max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Invoked as `kubectl-txr` (`kubectl txr …`), the relay comes as the
/// argument after the command, as kubectl's own commands take a resource:
/// `kubectl txr stats payments/dapp` is `txrelay stats --relay payments/dapp`.
/// Under any other name the arguments are left as they are.
pub fn plugin_args(args: Vec<OsString>) -> Vec<OsString> {
    let invoked_as = args
        .first()
        .and_then(|arg0| std::path::Path::new(arg0).file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if invoked_as != "kubectl-txr" {
        return args;
    }
    let arg0 = args[0].clone();
    const TAKE_A_RELAY: [&str; 9] =
        ["list", "stats", "retry", "retry-all", "skip", "migrate", "doctor", "status", "report"];
    // Global flags that take a value, which may come before the command.
    const WITH_VALUE: [&str; 6] = ["--config", "--schema", "--log-format", "--db-pool-size", "--relay", "--context"];
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut command: Option<String> = None;
    let mut value_next = false;
    let mut relay_taken = false;
    for arg in args.into_iter().skip(1) {
        let text = arg.to_string_lossy().into_owned();
        let flag = text.starts_with('-');
        if value_next {
            value_next = false;
        } else if flag {
            value_next = WITH_VALUE.contains(&text.as_str());
            relay_taken |= text == "--relay" || text.starts_with("--relay=");
        } else if command.is_none() {
            command = Some(text);
        } else if !relay_taken
            && command.as_deref().is_some_and(|c| TAKE_A_RELAY.contains(&c))
            && RelayId::from_str(&text).is_ok()
        {
            relay_taken = true;
            out.push("--relay".into());
        }
        out.push(arg);
    }
    out.insert(0, arg0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn as_kubectl_txr_the_relay_is_the_argument_after_the_command() {
        assert_eq!(
            plugin_args(args("kubectl-txr stats payments/dapp")),
            args("kubectl-txr stats --relay payments/dapp")
        );
        assert_eq!(
            plugin_args(args("/usr/local/bin/kubectl-txr retry-all payments/dapp --include-dead")),
            args("/usr/local/bin/kubectl-txr retry-all --relay payments/dapp --include-dead")
        );
        assert_eq!(
            plugin_args(args("kubectl-txr retry payments/dapp 42")),
            args("kubectl-txr retry --relay payments/dapp 42")
        );
        assert_eq!(
            plugin_args(args("kubectl-txr --context prod list payments/dapp")),
            args("kubectl-txr --context prod list --relay payments/dapp")
        );
        assert_eq!(plugin_args(args("kubectl-txr get -A")), args("kubectl-txr get -A"), "get takes no relay");
        assert_eq!(
            plugin_args(args("kubectl-txr stats --relay payments/dapp")),
            args("kubectl-txr stats --relay payments/dapp"),
            "an explicit --relay is left alone"
        );
        assert_eq!(plugin_args(args("txrelay stats payments/dapp")), args("txrelay stats payments/dapp"));
    }

    #[test]
    fn relay_names_are_namespace_slash_name() {
        assert_eq!("payments/dapp".parse::<RelayId>().unwrap().to_string(), "payments/dapp");
        for bad in ["dapp", "/dapp", "payments/", "Payments/dapp", "a/b/c", "payments/da pp"] {
            assert!(bad.parse::<RelayId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ages_read_as_kubectl_prints_them() {
        let cases = [(45, "45s"), (600, "10m"), (5 * 3600, "5h"), (3 * 86400, "3d")];
        for (seconds, shown) in cases {
            assert_eq!(short_age(chrono::Duration::seconds(seconds)), shown);
        }
    }
}
