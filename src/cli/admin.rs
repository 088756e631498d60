//! The administrative commands, with parity to the old retry tool.

use std::io::IsTerminal;
use std::sync::Arc;

use clap::Args;

use super::{CliError, Global};
use crate::metrics::Metrics;
use crate::relay::Relay;
use crate::relay::{ResendRequest, RetryAllReport};
use crate::runtime::config::{self, ProcessEnv};
use crate::runtime::settings::RelaySettings;
use crate::store::{ListFilter, Store, StoreOptions};
use crate::store::{ResendAudit, ResendFilter};
use crate::transaction::Transaction;
use chrono::{DateTime, Utc};

#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct MigrateArgs {
    /// Undo the most recently applied migration.
    #[arg(long)]
    pub revert: bool,
    /// With --revert of the resend audit's migration: drop its records too
    /// (refused without this while it holds any; keep a copy first).
    #[arg(long, requires = "revert")]
    pub drop_resend_audit: bool,
    /// List migrations and whether each is applied.
    #[arg(long)]
    pub status: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
    /// Only dead-lettered transactions.
    #[arg(long)]
    pub failed: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Database id of the transaction.
    pub id: i64,
}

#[derive(Debug, Args)]
pub struct SkipArgs {
    /// Database id of the dead-lettered transaction.
    pub id: i64,
}

#[derive(Debug, Args)]
pub struct RetryAllArgs {
    /// Send at most this many.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Also revive dead-lettered transactions.
    #[arg(long, conflicts_with = "dead_only")]
    pub include_dead: bool,
    /// Only dead-lettered transactions (revived first).
    #[arg(long)]
    pub dead_only: bool,
    /// Only this wallet's transactions.
    #[arg(long)]
    pub wallet: Option<String>,
    /// Only transactions created at or after this time (RFC 3339, or a UTC date YYYY-MM-DD).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Only transactions created before this time (RFC 3339, or a UTC date YYYY-MM-DD).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
    /// Only transactions whose last error contains this text.
    #[arg(long)]
    pub error: Option<String>,
    /// Print what would be resent, with the count, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// At most this many messages per second ("N/s" or "N").
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|day| day.and_hms_opt(0, 0, 0))
        .map(|midnight| midnight.and_utc())
        .ok_or_else(|| format!("expected an RFC 3339 time or a date YYYY-MM-DD, got {text:?}"))
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.strip_suffix("/s").unwrap_or(text);
    match number.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("expected a positive number of messages per second such as 50/s, got {text:?}")),
    }
}

/// Who resends from the command line: the OS user, as the audit record
/// and its log line show it.
fn cli_audit(command: &'static str) -> ResendAudit {
    let user = ["USER", "LOGNAME", "USERNAME"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned());
    ResendAudit { actor: user, via: "cli", command }
}

async fn store(global: &Global) -> Result<Store, CliError> {
    let mut options = match &global.relay {
        Some(_) => settings(global).await?.store_options(2),
        None => {
            let manifest = global.manifest()?;
            StoreOptions::new(config::database_url(&ProcessEnv)?, manifest.spec.database.schema)
        }
    };
    options.max_connections = 2;
    Ok(Store::connect(&options).await?)
}

/// A relay's settings: with `--relay`, from its TransactionRelay and Secrets
/// in the cluster; otherwise from the manifest and the environment.
async fn settings(global: &Global) -> Result<RelaySettings, CliError> {
    let mut settings = match &global.relay {
        Some(relay) => super::cluster::settings(relay, global.context.as_deref()).await?,
        None => return Ok(config::relay_settings(&global.manifest()?, &ProcessEnv)?),
    };
    if let Some(schema) = global.schema()? {
        settings.spec.database.schema = schema;
    }
    Ok(settings)
}

async fn relay(global: &Global) -> Result<Arc<Relay>, CliError> {
    let settings = settings(global).await?;
    // Small: one command's sends, never a server's load.
    let handle = settings.build(&Metrics::new(), 4).await?;
    handle.relay.store().ping().await?;
    Ok(handle.relay)
}

pub async fn migrate(global: &Global, args: MigrateArgs) -> Result<(), CliError> {
    let store = store(global).await?;
    if args.status {
        for migration in store.status().await? {
            let state = migration
                .installed_on
                .map_or_else(|| "pending".to_owned(), |at| format!("applied {}", at.to_rfc3339()));
            println!("{:<16} {:<40} {state}", migration.version, migration.description);
        }
    } else if args.revert {
        match store.revert_last_migration_with(args.drop_resend_audit).await? {
            Some(version) => println!("reverted migration {version}"),
            None => println!("no migration to revert"),
        }
    } else {
        store.migrate().await?;
        let applied = store.status().await?.iter().filter(|m| m.installed_on.is_some()).count();
        println!("schema {} is up to date ({applied} migrations applied)", store.schema());
    }
    Ok(())
}

pub async fn list(global: &Global, args: ListArgs) -> Result<(), CliError> {
    let store = store(global).await?;
    let filter = ListFilter {
        failed: args.failed,
        not_sent: !args.failed,
        limit: args.limit.clamp(1, 10_000),
        ..ListFilter::default()
    };
    let transactions = store.list(&filter).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&transactions).map_err(CliError::failed)?);
        return Ok(());
    }
    if transactions.is_empty() {
        println!("no {} transactions", if args.failed { "dead-lettered" } else { "unsent" });
        return Ok(());
    }
    println!("{:>8}  {:<24} {:<8} {:>8}  {:<25} LAST ERROR", "ID", "REFERENCE", "STATE", "ATTEMPTS", "NEXT ATTEMPT");
    for tx in &transactions {
        println!("{}", list_row(tx));
    }
    Ok(())
}

fn list_row(tx: &Transaction) -> String {
    let next = tx.next_attempt_at.map_or_else(|| "-".to_owned(), |at| at.to_rfc3339());
    format!(
        "{:>8}  {:<24} {:<8} {:>8}  {:<25} {}",
        tx.id,
        tx.reference,
        tx.delivery().as_str(),
        tx.attempts,
        next,
        tx.last_error.as_deref().unwrap_or("")
    )
}

pub async fn stats(global: &Global, args: StatsArgs) -> Result<(), CliError> {
    let stats = store(global).await?.stats().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats).map_err(CliError::failed)?);
        return Ok(());
    }
    println!("total:  {}\nsent:   {}\nunsent: {}\nfailed: {}", stats.total, stats.sent, stats.unsent, stats.failed);
    if !stats.by_status.is_empty() {
        println!("by status:");
        for (status, count) in &stats.by_status {
            println!("  {status:<24} {count}");
        }
    }
    Ok(())
}

pub async fn retry(global: &Global, args: RetryArgs) -> Result<(), CliError> {
    let relay = relay(global).await?;
    let message_id = relay.resend().retry_one(args.id, &cli_audit("retry")).await.map_err(CliError::failed)?;
    println!("{message_id}");
    Ok(())
}

pub async fn skip(global: &Global, args: SkipArgs) -> Result<(), CliError> {
    let relay = relay(global).await?;
    relay.resend().skip_one(args.id, &cli_audit("skip")).await.map_err(CliError::failed)?;
    println!("skipped {}: it stays dead-lettered, and its wallet's later transactions go on", args.id);
    Ok(())
}

pub async fn retry_all(global: &Global, args: RetryAllArgs) -> Result<(), CliError> {
    let request = ResendRequest {
        filter: ResendFilter {
            wallet: args.wallet,
            since: args.since,
            until: args.until,
            error: args.error,
            include_dead: args.include_dead,
            dead_only: args.dead_only,
        },
        limit: args.limit,
        rate: args.rate,
        dry_run: args.dry_run,
        budget: None,
    };
    // Checked before anything is read or sent.
    request.validate().map_err(|e| config::ConfigError::new(format!("--{}", e.field.replace('_', "-")), e.message))?;
    let relay = relay(global).await?;
    let bar = (!args.dry_run && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} sent, {msg}") {
            bar.set_style(style);
        }
        bar
    });
    if let Some(bar) = &bar {
        let limit = i64::try_from(request.limit.unwrap_or(u64::MAX)).unwrap_or(i64::MAX);
        bar.set_length(relay.store().count_resend_candidates(&request.filter, limit).await?.unsigned_abs());
    }
    // SIGINT or SIGTERM: the round in flight finishes and is recorded, the
    // rest of its rows are given back, and the audit record says the run
    // was interrupted. A second signal does not cut that short: it takes
    // at most one call's timeout.
    let (interrupt, interrupted) = tokio::sync::watch::channel(false);
    // Registered here, before anything starts: a signal from now on never
    // takes the default action (killing the process mid-send).
    use tokio::signal::unix::{SignalKind, signal};
    let registered = signal(SignalKind::interrupt()).and_then(|i| Ok((i, signal(SignalKind::terminate())?)));
    let (mut sigint, mut sigterm) =
        registered.map_err(|error| CliError::failed(format!("cannot handle SIGINT/SIGTERM: {error}")))?;
    let signals = tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        eprintln!("interrupted: finishing the calls in flight and recording them");
        let _ = interrupt.send(true);
    });
    let report = relay
        .resend()
        .retry_all(&request, &cli_audit("retry-all"), &interrupted, |progress: &RetryAllReport| {
            if let Some(bar) = &bar {
                bar.set_position(progress.total as u64);
                bar.set_message(format!("{} failed", progress.failed));
            }
        })
        .await;
    signals.abort();
    let report = report.map_err(CliError::failed)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.dry_run {
        if !report.rows.is_empty() {
            println!("{:>8}  {:<24} {:<24} {:<8} {:>8}  LAST ERROR", "ID", "REFERENCE", "WALLET", "STATE", "ATTEMPTS");
        }
        for row in &report.rows {
            println!(
                "{:>8}  {:<24} {:<24} {:<8} {:>8}  {}",
                row.id,
                row.reference,
                row.wallet_address,
                if row.dead_lettered { "failed" } else { "unsent" },
                row.attempts,
                row.last_error.as_deref().unwrap_or("")
            );
        }
        if *interrupted.borrow() {
            return Err(CliError::Interrupted(format!(
                "interrupted after listing {} rows (dry run: nothing changed)",
                report.selected
            )));
        }
        println!("would resend: {} (dry run: nothing changed)", report.selected);
        return Ok(());
    }
    if let Some(audit_id) = report.audit_id {
        println!("audit record: {audit_id}");
    }
    if report.revived > 0 || args.include_dead || args.dead_only {
        println!("revived: {}", report.revived);
    }
    println!("total: {}\nsucceeded: {}\nfailed: {}", report.total, report.succeeded, report.failed);
    if report.not_taken > 0 {
        println!(
            "not taken: {} (held by a running relay, which sends them, or behind an older unsent row of their wallet)",
            report.not_taken
        );
    }
    if let Some(reason) = &report.stopped {
        if *interrupted.borrow() {
            return Err(CliError::Interrupted(format!("stopped early: {reason}")));
        }
        return Err(CliError::Failed(format!("stopped early: {reason}")));
    }
    if report.failed > 0 {
        return Err(CliError::Failed(format!("{} transactions could not be sent; see `txrelay list`", report.failed)));
    }
    Ok(())
}
