//! `kubectl txr status NS/NAME` (what the relay is doing, on one screen) and
//! `kubectl txr report NS/NAME` (one archive for an incident ticket). Both
//! read with the caller's own permissions; a part the caller may not read
//! is named as such, never guessed. Secret values are never read into
//! either: the report's relay settings come from the cluster as `doctor`
//! reads them, and only checks and counts are written out.

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Args;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::cluster::client;
use super::{CliError, Global};
use crate::operator::{DATABASE_REACHABLE, QUEUE_REACHABLE, READY};
use crate::runtime::config::ConfigError;
use crate::spec::RelayId;
use crate::spec::TransactionRelay;

/// The operator's Lease (leader election), in the operator's namespace.
const LEASE: &str = "txrelay-operator";
/// Events shown by `status`, newest first.
const EVENTS_SHOWN: usize = 10;
/// Audit records in a report, newest first.
const AUDITS_KEPT: i64 = 50;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The namespace the operator runs in (its leader-election Lease).
    #[arg(long, default_value = "txrelay-system", env = "TXRELAY_OPERATOR_NAMESPACE")]
    pub operator_namespace: String,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The namespace the operator runs in (its leader-election Lease).
    #[arg(long, default_value = "txrelay-system", env = "TXRELAY_OPERATOR_NAMESPACE")]
    pub operator_namespace: String,
    /// Where to write the archive (default:
    /// txrelay-report-NAMESPACE-NAME-TIMESTAMP.tar in the current directory).
    #[arg(long, short)]
    pub output: Option<std::path::PathBuf>,
}

fn relay_of(global: &Global, command: &str) -> Result<RelayId, CliError> {
    global.relay.clone().ok_or_else(|| {
        ConfigError::new("--relay", format!("{command} needs the relay: `kubectl txr {command} NAMESPACE/NAME`")).into()
    })
}

/// A refusal of the API server as the exit-code edge wants it: the caller's
/// setup (403, 404: exit 2) or worth a retry (exit 1).
fn api_error(what: &str, error: kube::Error) -> CliError {
    match &error {
        kube::Error::Api(status) if status.code == 403 => {
            CliError::Config(ConfigError::new(what.to_owned(), format!("forbidden: {}", status.message)))
        }
        kube::Error::Api(status) if status.code < 500 && status.code != 429 => {
            CliError::Config(ConfigError::new(what.to_owned(), status.message.clone()))
        }
        _ => CliError::failed(format!("{what}: {error}")),
    }
}

/// What the cluster says about a relay: the resource, its recent Events and
/// the operator's leader. Events and the Lease are optional reads: a
/// refusal is kept as its reason.
struct Observed {
    relay: TransactionRelay,
    events: Result<Vec<Event>, String>,
    lease: Result<Lease, String>,
}

async fn observe(client: &Client, relay: &RelayId, operator_namespace: &str) -> Result<Observed, CliError> {
    let what = format!("transactionrelay {relay}");
    let resource = Api::<TransactionRelay>::namespaced(client.clone(), &relay.namespace)
        .get(&relay.name)
        .await
        .map_err(|e| api_error(&what, e))?;
    let selector = format!("regarding.kind=TransactionRelay,regarding.name={}", relay.name);
    let events = Api::<Event>::namespaced(client.clone(), &relay.namespace)
        .list(&ListParams::default().fields(&selector))
        .await
        .map(|list| {
            let mut events = list.items;
            events.sort_by_key(|e| std::cmp::Reverse(event_time(e)));
            events
        })
        .map_err(|e| optional_read("events", &e));
    let lease = Api::<Lease>::namespaced(client.clone(), operator_namespace)
        .get(LEASE)
        .await
        .map_err(|e| optional_read(&format!("lease {operator_namespace}/{LEASE}"), &e));
    Ok(Observed { relay: resource, events, lease })
}

fn optional_read(what: &str, error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if status.code == 403 => format!("cannot read {what}: forbidden"),
        kube::Error::Api(status) if status.code == 404 => format!("no {what}"),
        other => format!("cannot read {what}: {other}"),
    }
}

fn event_time(event: &Event) -> Option<DateTime<Utc>> {
    let seconds = event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0.as_second())
        .or_else(|| event.event_time.as_ref().map(|t| t.0.as_second()))
        .or_else(|| event.deprecated_last_timestamp.as_ref().map(|t| t.0.as_second()))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()))?;
    DateTime::from_timestamp(seconds, 0)
}

fn age(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    at.map_or_else(|| "-".to_owned(), |at| super::cluster::short_age(now - at))
}

fn time_of(seconds: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(seconds, 0)
}

/// The text of `status`.
fn render_status(observed: &Observed, now: DateTime<Utc>) -> String {
    let relay = &observed.relay;
    let status = relay.status.clone().unwrap_or_default();
    let mut out = String::new();
    let name = format!("{}/{}", relay.namespace().unwrap_or_default(), relay.name_any());
    let generation = relay.metadata.generation.unwrap_or_default();
    let observed_generation = status.observed_generation.map_or("-".to_owned(), |g| g.to_string());
    out.push_str(&format!(
        "TransactionRelay {name}   generation {generation}, observed {observed_generation}{}\n",
        if relay.spec.suspend { "   SUSPENDED" } else { "" }
    ));
    out.push_str("\nConditions:\n");
    if status.conditions.is_empty() {
        out.push_str("  none yet (the operator has not written a status)\n");
    }
    for condition in &status.conditions {
        let since = time_of(condition.last_transition_time.0.as_second());
        out.push_str(&format!(
            "  {:<18} {:<7} {:<24} {:>5}  {}\n",
            condition.type_,
            condition.status,
            condition.reason,
            age(since, now),
            condition.message.replace('\n', " ")
        ));
    }
    let reachable = |type_: &str| {
        status.conditions.iter().find(|c| c.type_ == type_).map_or("unknown".to_owned(), |c| match c.status.as_str() {
            "True" => "reachable".to_owned(),
            "False" => format!("UNREACHABLE ({})", c.reason),
            _ => "unknown".to_owned(),
        })
    };
    out.push_str(&format!("\nDatabase: {}\nQueue:    {}\n", reachable(DATABASE_REACHABLE), reachable(QUEUE_REACHABLE)));
    let number = |n: Option<i64>| n.map_or("-".to_owned(), |n| n.to_string());
    let oldest = status.oldest_unsent_time.as_ref().map(|t| age(time_of(t.0.as_second()), now));
    out.push_str(&format!(
        "Backlog:  {} unsent (oldest {}), {} dead-lettered\n",
        number(status.unsent),
        oldest.unwrap_or_else(|| "-".to_owned()),
        number(status.failed)
    ));
    let sweep = status.last_sweep_time.as_ref().map(|t| time_of(t.0.as_second()));
    out.push_str(&format!("Last sweep: {} ago\n", age(sweep.flatten(), now)));
    out.push_str(&format!("Last error: {}\n", status.last_error.as_deref().unwrap_or("none").replace('\n', " ")));
    match &observed.lease {
        Ok(lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let renewed = spec.renew_time.as_ref().and_then(|t| time_of(t.0.as_second()));
            out.push_str(&format!(
                "Leader:   {} (renewed {} ago)\n",
                spec.holder_identity.as_deref().unwrap_or("none"),
                age(renewed, now)
            ));
        }
        Err(reason) => out.push_str(&format!("Leader:   unknown ({reason})\n")),
    }
    out.push_str("\nRecent events:\n");
    match &observed.events {
        Ok(events) if events.is_empty() => out.push_str("  none\n"),
        Ok(events) => {
            for event in events.iter().take(EVENTS_SHOWN) {
                out.push_str(&format!(
                    "  {:>5}  {:<8} {:<28} {}\n",
                    age(event_time(event), now),
                    event.type_.as_deref().unwrap_or(""),
                    event.reason.as_deref().unwrap_or(""),
                    event.note.as_deref().unwrap_or("").replace('\n', " ")
                ));
            }
        }
        Err(reason) => out.push_str(&format!("  unknown ({reason})\n")),
    }
    // A relay Ready=False gets its reason repeated last, where the eye lands.
    if let Some(ready) = status.conditions.iter().find(|c| c.type_ == READY && c.status != "True") {
        out.push_str(&format!("\nNot ready: {}: {}\n", ready.reason, ready.message.replace('\n', " ")));
    }
    out
}

pub async fn status(global: &Global, args: StatusArgs) -> Result<(), CliError> {
    let relay = relay_of(global, "status")?;
    let client = client(global.context.as_deref()).await?;
    let observed = observe(&client, &relay, &args.operator_namespace).await?;
    print!("{}", render_status(&observed, Utc::now()));
    Ok(())
}

/// Drops what only clutters a ticket (managed fields) and the annotations:
/// they are free text anyone with write access fills (the last-applied
/// configuration is the raw manifest as applied), so nothing vouches that
/// they hold no secret.
fn tidy(mut value: serde_json::Value) -> serde_json::Value {
    if let Some(metadata) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        metadata.remove("managedFields");
        metadata.remove("annotations");
    }
    value
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value)
        .map(|text| text + "\n")
        .unwrap_or_else(|error| format!("could not render: {error}\n"))
}

pub async fn report(global: &Global, args: ReportArgs) -> Result<(), CliError> {
    let relay = relay_of(global, "report")?;
    let client = client(global.context.as_deref()).await?;
    let now = Utc::now();
    let observed = observe(&client, &relay, &args.operator_namespace).await?;
    let mut files: Vec<(String, String)> = Vec::new();
    files.push(("status.txt".into(), render_status(&observed, now)));
    let resource = tidy(serde_json::to_value(&observed.relay).unwrap_or_default());
    files.push(("transactionrelay.json".into(), json(&resource)));
    files.push((
        "events.json".into(),
        match &observed.events {
            Ok(events) => {
                json(&events.iter().map(|e| tidy(serde_json::to_value(e).unwrap_or_default())).collect::<Vec<_>>())
            }
            Err(reason) => json(&serde_json::json!({ "unavailable": reason })),
        },
    ));
    files.push((
        "lease.json".into(),
        match &observed.lease {
            Ok(lease) => json(&tidy(serde_json::to_value(lease).unwrap_or_default())),
            Err(reason) => json(&serde_json::json!({ "unavailable": reason })),
        },
    ));
    // doctor, as `kubectl txr doctor` prints it, with the caller's access.
    let (doctor, _) = super::doctor::run(global, false).await;
    files.push(("doctor.txt".into(), doctor));
    let (metrics, audits) = database_parts(global, &relay).await;
    files.push(("metrics.txt".into(), metrics));
    files.push(("resend-audit.json".into(), audits));
    files.push((
        "README.txt".into(),
        format!(
            "txrelay {} report of {relay}, written {} by `kubectl txr report`.\n\
             status.txt: what `kubectl txr status` shows. transactionrelay.json, events.json, lease.json: as the \
             API server has them (managedFields dropped). doctor.txt: `kubectl txr doctor`. metrics.txt: the \
             relay's backlog gauges, computed from its database as the relay exports them. resend-audit.json: the \
             last {AUDITS_KEPT} resends by hand. No Secret value is included.\n",
            env!("CARGO_PKG_VERSION"),
            now.to_rfc3339()
        ),
    ));
    let path = args.output.unwrap_or_else(|| {
        format!("txrelay-report-{}-{}-{}.tar", relay.namespace, relay.name, now.format("%Y%m%dT%H%M%SZ")).into()
    });
    // A fixed, short directory: the archive's name says which relay, and
    // ustar names stop at 100 bytes.
    let directory = "txrelay-report";
    let archive = tar(directory, &files, now.timestamp());
    std::fs::File::create(&path)
        .and_then(|mut file| file.write_all(&archive))
        .map_err(|error| CliError::failed(format!("cannot write {}: {error}", path.display())))?;
    println!("wrote {} ({} files)", path.display(), files.len());
    Ok(())
}

/// The relay's gauges (as its /metrics would show them) and its last
/// audit records, read from its database; a part that cannot be read says
/// why instead.
async fn database_parts(global: &Global, relay: &RelayId) -> (String, String) {
    const BOUND: Duration = Duration::from_secs(15);
    let built = async {
        let settings = super::cluster::settings(relay, global.context.as_deref()).await?;
        let metrics = crate::metrics::Metrics::new();
        let handle = settings.build(&metrics, 1).await?;
        Ok::<_, CliError>((handle, metrics))
    };
    let (handle, metrics) = match tokio::time::timeout(BOUND, built).await {
        Ok(Ok(built)) => built,
        Ok(Err(error)) => {
            let note = format!("# could not read the relay's database: {error}\n");
            return (note.clone(), note);
        }
        Err(_) => {
            let note = format!("# the relay's database did not answer within {BOUND:?}\n");
            return (note.clone(), note);
        }
    };
    let store = handle.relay.store().clone();
    let gauges = match tokio::time::timeout(BOUND, handle.relay.outbox().refresh_gauges()).await {
        Ok(Ok(_)) => metrics.render(),
        Ok(Err(error)) => format!("# could not read the backlog: {error}\n"),
        Err(_) => format!("# the backlog query did not answer within {BOUND:?}\n"),
    };
    let audits = match tokio::time::timeout(BOUND, store.recent_resend_audits(AUDITS_KEPT)).await {
        Ok(Ok(records)) => serde_json::to_string_pretty(&records).unwrap_or_default() + "\n",
        Ok(Err(error)) => format!("# could not read resend_audit: {error}\n"),
        Err(_) => format!("# resend_audit did not answer within {BOUND:?}\n"),
    };
    store.close().await;
    (gauges, audits)
}

/// A POSIX ustar archive of `files` under `directory/`: readable by `tar
/// xf` everywhere, with no dependency for a few small text files.
fn tar(directory: &str, files: &[(String, String)], mtime: i64) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, contents) in files {
        let mut header = [0u8; 512];
        let path = format!("{directory}/{name}");
        let path = &path.as_bytes()[..path.len().min(100)];
        header[..path.len()].copy_from_slice(path);
        // Zero-padded octal, NUL-terminated, as ustar wants numbers.
        let octal = |field: &mut [u8], value: u64| {
            let digits = field.len() - 1;
            let text = format!("{value:0digits$o}");
            field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
        };
        octal(&mut header[100..108], 0o644);
        octal(&mut header[108..116], 0);
        octal(&mut header[116..124], 0);
        octal(&mut header[124..136], contents.len() as u64);
        octal(&mut header[136..148], u64::try_from(mtime).unwrap_or(0));
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        // The checksum is computed with its own field read as spaces.
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
        let text = format!("{sum:06o}\0 ");
        header[148..156].copy_from_slice(text.as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(contents.as_bytes());
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::tar;

    #[test]
    fn the_archive_is_a_tar_that_tar_reads_back() {
        let files = vec![("a.txt".to_owned(), "hello\n".to_owned()), ("b.yaml".to_owned(), "x: 1\n".repeat(300))];
        let archive = tar("report", &files, 1_764_000_000);
        assert_eq!(archive.len() % 512, 0);
        let dir = std::env::temp_dir().join(format!("txrelay-tar-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.tar");
        std::fs::write(&path, &archive).unwrap();
        let status = std::process::Command::new("tar").arg("xf").arg(&path).current_dir(&dir).status().unwrap();
        assert!(status.success());
        assert_eq!(std::fs::read_to_string(dir.join("report/a.txt")).unwrap(), "hello\n");
        assert_eq!(std::fs::read_to_string(dir.join("report/b.yaml")).unwrap(), "x: 1\n".repeat(300));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
