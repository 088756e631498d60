//! The administrative commands, with parity to the old retry tool.

use std::io::IsTerminal;
use std::sync::Arc;

use clap::Args;

use super::{CliError, Global};
use crate::config::{self, ProcessEnv};
use crate::metrics::Metrics;
use crate::relay::Relay;
use crate::relay::RetryAllReport;
use crate::settings::RelaySettings;
use crate::store::{ListFilter, Store, StoreOptions};
use crate::transaction::Transaction;

#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct MigrateArgs {
    /// Undo the most recently applied migration.
    #[arg(long)]
    pub revert: bool,
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
pub struct RetryAllArgs {
    /// Send at most this many.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Also revive dead-lettered transactions.
    #[arg(long)]
    pub include_dead: bool,
}

async fn store(global: &Global) -> Result<Store, CliError> {
    let mut options = match &global.relay {
        Some(_) => settings(global, 2).await?.store_options(),
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
async fn settings(global: &Global, pool_size: u32) -> Result<RelaySettings, CliError> {
    let mut settings = match &global.relay {
        Some(relay) => super::cluster::settings(relay, global.context.as_deref(), pool_size).await?,
        None => return Ok(config::relay_settings(&global.manifest()?, &ProcessEnv, pool_size)?),
    };
    if let Some(schema) = &global.schema {
        if !crate::spec::is_schema_name(schema) {
            return Err(config::ConfigError::new(
                "--schema",
                format!("must match {}", crate::spec::SCHEMA_NAME_PATTERN),
            )
            .into());
        }
        settings.spec.database.schema = schema.clone();
    }
    Ok(settings)
}

async fn relay(global: &Global) -> Result<Arc<Relay>, CliError> {
    let settings = settings(global, 4).await?;
    let handle = settings.build(&Metrics::new()).await?;
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
        match store.revert_last_migration().await? {
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
    let message_id = relay.retry_one(args.id).await.map_err(CliError::failed)?;
    println!("{message_id}");
    Ok(())
}

pub async fn retry_all(global: &Global, args: RetryAllArgs) -> Result<(), CliError> {
    let relay = relay(global).await?;
    let counts = relay.store().counts().await?;
    let expected = (counts.unsent + if args.include_dead { counts.failed } else { 0 }).max(0) as u64;
    let expected = args.limit.map_or(expected, |limit| limit.min(expected));
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(expected);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} sent, {msg}") {
            bar.set_style(style);
        }
        bar
    });
    let report = relay
        .retry_all(args.limit, args.include_dead, |progress: &RetryAllReport| {
            if let Some(bar) = &bar {
                bar.set_position(progress.total as u64);
                bar.set_message(format!("{} failed", progress.failed));
            }
        })
        .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.include_dead {
        println!("revived: {}", report.revived);
    }
    println!("total: {}\nsucceeded: {}\nfailed: {}", report.total, report.succeeded, report.failed);
    if let Some(reason) = &report.stopped {
        return Err(CliError::Failed(format!("stopped early: {reason}")));
    }
    if report.failed > 0 {
        return Err(CliError::Failed(format!("{} transactions could not be sent; see `txrelay list`", report.failed)));
    }
    Ok(())
}
