//! `txrelay doctor`: one line per dependency of a relay, ✓ or ✗ with how to
//! fix it, and exit code 1 when anything is wrong. The first step of every
//! alert's runbook. Secret values are never printed.

use std::time::Duration;

use clap::Args;

use super::{CliError, Global};
use crate::queue::Queue;
use crate::queue::sqs::{SqsQueue, is_not_allowed};
use crate::runtime::config::{self, ProcessEnv};
use crate::runtime::settings::RelaySettings;
use crate::store::Store;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Also send one test message, with the attribute txrelay_doctor=true
    /// for consumers to drop: the only proof that sqs:SendMessage works.
    #[arg(long)]
    pub send_test: bool,
}

/// Each check's network calls are bounded by this.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Report {
    failed: usize,
    /// Print each line as it comes (the command), or only keep it (a
    /// `report` archive).
    quiet: bool,
    text: String,
}

impl Report {
    fn line(&mut self, line: String) {
        if !self.quiet {
            println!("{line}");
        }
        self.text.push_str(&line);
        self.text.push('\n');
    }

    fn pass(&mut self, what: impl std::fmt::Display) {
        self.line(format!("✓ {what}"));
    }

    fn fail(&mut self, what: impl std::fmt::Display, fix: impl std::fmt::Display) {
        self.line(format!("✗ {what}\n    fix: {fix}"));
        self.failed += 1;
    }

    fn note(&mut self, what: impl std::fmt::Display, hint: impl std::fmt::Display) {
        self.line(format!("! {what}\n    {hint}"));
    }

    fn finish(self) -> Result<(), CliError> {
        match self.failed {
            0 => Ok(()),
            1 => Err(CliError::Failed("1 check failed".into())),
            n => Err(CliError::Failed(format!("{n} checks failed"))),
        }
    }
}

pub async fn doctor(global: &Global, args: DoctorArgs) -> Result<(), CliError> {
    let mut report = Report::default();
    checks(global, args.send_test, &mut report).await;
    report.finish()
}

/// The same checks, printing nothing: their text, and whether all passed
/// (`kubectl txr report`).
pub async fn run(global: &Global, send_test: bool) -> (String, bool) {
    let mut report = Report { quiet: true, ..Report::default() };
    checks(global, send_test, &mut report).await;
    (report.text, report.failed == 0)
}

async fn checks(global: &Global, send_test: bool, report: &mut Report) {
    let Some(settings) = settings(global, report).await else {
        return;
    };
    if let Some(store) = database(&settings, report).await {
        migrations(&store, report).await;
        store.close().await;
    }
    queue(&settings, send_test, report).await;
    if settings.ingest_tokens.is_empty() {
        let fix = match &global.relay {
            Some(_) => "set spec.ingest.tokenSecretRef to a Secret key holding the dApp's tokens",
            None => "set RELAY_API_TOKENS (comma-separated)",
        };
        report.fail("no ingest token: POST /new would answer 401 to every request", fix);
    } else {
        report.pass(format!("ingest tokens set ({})", settings.ingest_tokens.len()));
    }
}

/// The manifest (or resource) and the secrets it names.
async fn settings(global: &Global, report: &mut Report) -> Option<RelaySettings> {
    match &global.relay {
        Some(relay) => match super::cluster::settings_with_tokens(relay, global.context.as_deref()).await {
            Ok(settings) => {
                report.pass(format!("TransactionRelay {relay} found and valid"));
                report.pass(format!(
                    "Secrets {} and {} resolve",
                    settings.spec.database.secret_ref.name, settings.spec.queue.secret_ref.name
                ));
                Some(settings)
            }
            Err(error) => {
                report.fail(
                    error.to_string(),
                    "check the resource and the Secrets it names (kubectl describe transactionrelay)",
                );
                None
            }
        },
        None => {
            let manifest = match global.manifest() {
                Ok(manifest) => manifest,
                Err(error) => {
                    report.fail(format!("manifest: {error}"), "correct the field named");
                    return None;
                }
            };
            report.pass(match &global.config {
                Some(path) => format!("manifest {} is valid", path.display()),
                None => "no manifest: every default".to_owned(),
            });
            match config::relay_settings(&manifest, &ProcessEnv) {
                Ok(settings) => {
                    report.pass("settings resolve from the environment");
                    Some(settings)
                }
                Err(error) => {
                    report.fail(
                        error.to_string(),
                        "set the variable named (see docs/reference/configuration.md#environment-variables)",
                    );
                    None
                }
            }
        }
    }
}

async fn database(settings: &RelaySettings, report: &mut Report) -> Option<Store> {
    let options = settings.store_options(1);
    let store = match tokio::time::timeout(CHECK_TIMEOUT, Store::connect(&options)).await {
        Ok(Ok(store)) => store,
        Ok(Err(error)) => {
            report.fail(
                format!("database unreachable: {error}"),
                "check the URL's host, port, user and sslmode, and that PostgreSQL accepts connections from here",
            );
            return None;
        }
        Err(_) => {
            report.fail(
                format!("database did not answer within {CHECK_TIMEOUT:?}"),
                "check the network path to PostgreSQL (firewall, NetworkPolicy, DNS)",
            );
            return None;
        }
    };
    match store.tls_in_use().await {
        Ok(true) => report.pass("database reachable, over TLS"),
        Ok(false) => report.pass("database reachable, without TLS (add sslmode=require to the URL to insist on it)"),
        Err(error) => report.fail(format!("database: {error}"), "check the database user's permissions"),
    }
    Some(store)
}

async fn migrations(store: &Store, report: &mut Report) {
    let schema = store.schema().to_owned();
    match store.schema_exists().await {
        Ok(true) => {}
        Ok(false) => {
            report.fail(format!("schema {schema} does not exist"), "run `txrelay migrate` (or start the relay)");
            return;
        }
        Err(error) => {
            report.fail(format!("schema {schema}: {error}"), "check the database user's permissions");
            return;
        }
    }
    match store.status().await {
        Ok(status) => {
            let pending: Vec<String> = status
                .iter()
                .filter(|m| m.installed_on.is_none())
                .map(|m| format!("{} {}", m.version, m.description))
                .collect();
            if pending.is_empty() {
                report.pass(format!("schema {schema} exists, every migration applied ({})", status.len()));
                drift(store, report).await;
                vacuum(store, report).await;
            } else {
                report.fail(
                    format!("schema {schema}: migrations pending: {}", pending.join(", ")),
                    "run `txrelay migrate` (the relay applies them at start unless --no-migrate)",
                );
            }
        }
        Err(error) => report.fail(format!("schema {schema}: {error}"), "check the database user's permissions"),
    }
}

/// Unsent rows that `unsent_transactions` does not list: the relay would
/// find them only at its next drift reconciliation.
async fn drift(store: &Store, report: &mut Report) {
    match store.count_unsent_drift().await {
        Ok(0) => report.pass("unsent_transactions lists every unsent transaction (no drift)"),
        Ok(rows) => report.fail(
            format!("{rows} unsent transactions are missing from unsent_transactions (drift)"),
            "a writer bypassed the triggers (DISABLE TRIGGER, a direct edit); a running relay lists them again \
             within its reconciliation bound (docs/delivery.md#drift), or restart it to do so at once",
        ),
        Err(error) => report.fail(format!("drift check: {error}"), "check the database user's permissions"),
    }
}

/// How long a transaction may hold back VACUUM's horizon before doctor (and
/// the TransactionRelayVacuumHeldBack alert) calls it a problem: well past
/// any request or migration step of the relay's own, well before the dead
/// tuples of a busy relay's bookkeeping table cost it throughput
/// (BENCHMARKS.md, sustained load with a transaction held).
const XMIN_AGE_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether VACUUM can keep `unsent_transactions` small: a transaction held
/// open for long (an analytics query, a session left `idle in transaction`)
/// stops it, and dead tuples pile up under every claim.
async fn vacuum(store: &Store, report: &mut Report) {
    let gauges = match store.gauges().await {
        Ok(gauges) => gauges,
        Err(error) => return report.fail(format!("vacuum check: {error}"), "check the database user's permissions"),
    };
    let age = std::time::Duration::from_secs_f64(gauges.oldest_xmin_age_seconds.max(0.0));
    let dead = gauges.unsent_dead_tuples;
    if age > XMIN_AGE_LIMIT {
        report.fail(
            format!(
                "a transaction open for {} s holds back VACUUM in this database; unsent_transactions has {dead} dead \
                 tuples",
                age.as_secs()
            ),
            "find it with `SELECT pid, usename, state, xact_start, query FROM pg_stat_activity WHERE backend_xmin IS \
             NOT NULL ORDER BY xact_start` and end it (docs/troubleshoot.md#transactionrelayvacuumheldback)",
        );
    } else {
        report.pass(format!(
            "VACUUM's horizon is {} s old (limit {} s); unsent_transactions has {dead} dead tuples",
            age.as_secs(),
            XMIN_AGE_LIMIT.as_secs()
        ));
    }
}

/// The region a queue URL names (`https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`
/// or the legacy `https://REGION.queue.amazonaws.com/...`), or why it is not
/// a queue URL. `None` for a URL that is well formed but names no region (a
/// local endpoint).
fn queue_url_region(url: &str) -> Result<Option<String>, String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| "does not start with https://".to_owned())?;
    let (host, path) = rest.split_once('/').ok_or_else(|| "has no /ACCOUNT/NAME path".to_owned())?;
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!("path /{path} is not /ACCOUNT/NAME"));
    }
    let host = host.split(':').next().unwrap_or(host);
    let labels: Vec<&str> = host.split('.').collect();
    Ok(match labels.as_slice() {
        ["sqs", region, "amazonaws", ..] => Some((*region).to_owned()),
        [region, "queue", "amazonaws", ..] => Some((*region).to_owned()),
        _ => None,
    })
}

async fn queue(settings: &RelaySettings, send_test: bool, report: &mut Report) {
    let url = &settings.queue.queue_url;
    let region = &settings.queue.region;
    match queue_url_region(url) {
        Err(why) => {
            report.fail(format!("queue URL {url} {why}"), "copy the URL from `aws sqs get-queue-url`");
            return;
        }
        Ok(Some(in_url)) if &in_url != region => {
            report.fail(
                format!("queue URL is in region {in_url} but the region is {region}"),
                "set the queue Secret's region (AWS_REGION) to the URL's",
            );
            return;
        }
        Ok(Some(_)) => report.pass(format!("queue URL well formed, region {region} matches")),
        Ok(None) => report.pass(format!("queue URL well formed (an endpoint of its own; region {region})")),
    }
    let queue = match SqsQueue::new(&settings.sqs_settings()).await {
        Ok(queue) => queue,
        Err(error) => {
            report.fail(format!("queue settings: {error}"), "correct the queue Secret");
            return;
        }
    };
    match tokio::time::timeout(CHECK_TIMEOUT, queue.check()).await {
        Ok(Ok(())) => report.pass("queue answers (GetQueueAttributes)"),
        Ok(Err(failure)) if failure.code.as_deref().is_some_and(is_not_allowed) => report.note(
            "GetQueueAttributes is denied (a send-only IAM policy): SendMessage cannot be checked without sending",
            "run `txrelay doctor --send-test` to send one test message",
        ),
        Ok(Err(failure)) => report
            .fail(format!("queue refused: {}", failure.reason()), "see docs/troubleshoot.md#the-queue-refuses-calls"),
        Err(_) => report.fail(
            format!("queue did not answer within {CHECK_TIMEOUT:?}"),
            "check the network path to SQS (egress NetworkPolicy, VPC endpoint, proxy)",
        ),
    }
    if send_test {
        match tokio::time::timeout(CHECK_TIMEOUT, queue.send_test()).await {
            Ok(Ok(message_id)) => {
                report.pass(format!("test message sent, message id {message_id} (attribute txrelay_doctor=true)"))
            }
            Ok(Err(failure)) => report.fail(
                format!("test message refused: {}", failure.reason()),
                "grant sqs:SendMessage on the queue (and kms:GenerateDataKey for an encrypted one)",
            ),
            Err(_) => report.fail(format!("test message not answered within {CHECK_TIMEOUT:?}"), "check SQS egress"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::queue_url_region;

    #[test]
    fn queue_urls_name_their_region_or_say_what_is_wrong() {
        let region = |url: &str| queue_url_region(url);
        assert_eq!(region("https://sqs.eu-west-1.amazonaws.com/123456789012/ledger"), Ok(Some("eu-west-1".into())));
        assert_eq!(
            region("https://eu-west-1.queue.amazonaws.com/123456789012/ledger.fifo"),
            Ok(Some("eu-west-1".into()))
        );
        assert_eq!(region("http://127.0.0.1:4566/000000000000/ledger"), Ok(None));
        assert!(region("sqs.eu-west-1.amazonaws.com/1/ledger").is_err());
        assert!(region("https://sqs.eu-west-1.amazonaws.com/ledger").is_err());
        assert!(region("https://sqs.eu-west-1.amazonaws.com/").is_err());
    }
}
