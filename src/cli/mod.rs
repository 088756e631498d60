//! The command line: one binary for the service, the operator and the
//! administrative commands the old retry tool had.

mod admin;
mod cluster;
mod doctor;
mod inspect;
mod operator;
mod serve;

pub use cluster::plugin_args;
pub use serve::shutdown_signal;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::duration::HumanDuration;
use crate::runtime::config::{ConfigError, Manifest};
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "txrelay", version, about = "Transactional-outbox relay: PostgreSQL first, then SQS")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// TransactionRelay manifest (retry interval, batch size, schema...).
    #[arg(long, global = true, env = "TXRELAY_CONFIG", conflicts_with = "relay")]
    pub config: Option<PathBuf>,
    /// A relay in the cluster (NAMESPACE/NAME): its TransactionRelay and
    /// Secrets are read through the Kubernetes API instead of a manifest
    /// and environment variables.
    #[arg(long, global = true, env = "TXRELAY_RELAY", value_name = "NAMESPACE/NAME")]
    pub relay: Option<crate::spec::RelayId>,
    /// kubeconfig context for --relay and get (default: the current one).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// PostgreSQL schema, overriding the manifest's spec.database.schema.
    #[arg(long, global = true, env = "TXRELAY_SCHEMA")]
    pub schema: Option<String>,
    #[arg(long, global = true, value_enum, default_value = "text", env = "TXRELAY_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Database connections per relay.
    #[arg(long, global = true, default_value_t = crate::store::DEFAULT_POOL_SIZE, env = "DATABASE_POOL_SIZE")]
    pub db_pool_size: u32,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one relay without Kubernetes: POST /new plus the relay loop.
    Run(serve::RunArgs),
    /// Run the Kubernetes operator for TransactionRelay resources.
    Operator(OperatorArgs),
    /// Create the schema and apply pending migrations (or revert / list them).
    Migrate(admin::MigrateArgs),
    /// List transactions not sent yet (unsent and dead-lettered).
    List(admin::ListArgs),
    /// Counts: total, sent, unsent, failed, by status.
    Stats(admin::StatsArgs),
    /// Send one transaction now, reviving it if dead-lettered.
    Retry(admin::RetryArgs),
    /// Send every unsent transaction now, ignoring backoff.
    RetryAll(admin::RetryAllArgs),
    /// Give up on a dead-lettered transaction for good, so its FIFO wallet's
    /// later transactions go on (audited; the row stays dead-lettered).
    Skip(admin::SkipArgs),
    /// Print the TransactionRelay CustomResourceDefinition (or, with
    /// --reference, its field reference in Markdown: docs/reference/crd.md).
    Crd(CrdArgs),
    /// List the cluster's TransactionRelays with their state and last error.
    Get(cluster::GetArgs),
    /// Check everything a relay depends on, one line each; exit 1 if any fails.
    Doctor(doctor::DoctorArgs),
    /// One relay at a glance: conditions, backlog, leader, last error, Events.
    Status(inspect::StatusArgs),
    /// Write one archive about a relay for an incident ticket (no secrets).
    Report(inspect::ReportArgs),
    /// Print a shell completion script: `source <(txrelay completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Watch only this namespace (default: all).
    #[arg(long, env = "TXRELAY_NAMESPACE")]
    pub namespace: Option<String>,
    /// The relay plain POST /new reaches when several are served (ns/name).
    #[arg(long)]
    pub default_relay: Option<String>,
    #[command(flatten)]
    pub http: HttpArgs,
}

#[derive(Debug, Args, Clone)]
pub struct HttpArgs {
    #[arg(long, default_value = "0.0.0.0:8080", env = "TXRELAY_LISTEN")]
    pub listen: SocketAddr,
    /// /metrics, /healthz and /readyz, never exposed by the Ingress.
    #[arg(long, default_value = "0.0.0.0:9090", env = "TXRELAY_METRICS_LISTEN")]
    pub metrics_listen: SocketAddr,
    /// Serve /new without bearer tokens. Local development only.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Proxy networks whose X-Forwarded-For is trusted (repeatable).
    #[arg(long = "trusted-proxy", value_name = "CIDR", env = "TXRELAY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Requests served at once before shedding load with 503.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    #[arg(long, default_value = "10s")]
    pub request_timeout: HumanDuration,
    /// Close a connection that has not sent a whole request head this long
    /// after it began waiting for one (slow clients; idle keep-alive).
    #[arg(long, default_value = "10s", env = "TXRELAY_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: HumanDuration,
    /// Connections served at once per listener; more wait until one closes.
    #[arg(long, default_value_t = 4096, env = "TXRELAY_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// How long SIGTERM waits for in-flight sends before exiting.
    #[arg(long, default_value = "10s")]
    pub grace_period: HumanDuration,
}

impl HttpArgs {
    pub fn options(&self) -> crate::http::HttpOptions {
        crate::http::HttpOptions {
            request_timeout: self.request_timeout.get(),
            max_in_flight: self.max_in_flight,
            trusted_proxies: self.trusted_proxies.clone(),
            insecure_no_auth: self.insecure_no_auth,
            header_read_timeout: self.header_read_timeout.get(),
            max_connections: self.max_connections,
            ..crate::http::HttpOptions::default()
        }
    }

    pub fn grace(&self) -> Duration {
        self.grace_period.get()
    }
}

/// Every failure of a command, mapped once to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Failed(String),
    /// Stopped by SIGINT or SIGTERM after recording what it did.
    #[error("{0}")]
    Interrupted(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 2,
            Self::Failed(_) => 1,
            // 128 + SIGINT, as a shell reports an interrupted command.
            Self::Interrupted(_) => 130,
        }
    }

    pub fn failed(error: impl std::fmt::Display) -> Self {
        Self::Failed(error.to_string())
    }
}

impl From<crate::store::StoreError> for CliError {
    fn from(error: crate::store::StoreError) -> Self {
        Self::failed(error)
    }
}

impl From<crate::runtime::settings::StartError> for CliError {
    fn from(error: crate::runtime::settings::StartError) -> Self {
        Self::failed(error)
    }
}

impl Global {
    /// The manifest, with `--schema` applied.
    pub fn manifest(&self) -> Result<Manifest, ConfigError> {
        let mut manifest = match &self.config {
            Some(path) => Manifest::load(path)?,
            None => Manifest::default_relay(),
        };
        if let Some(schema) = self.schema()? {
            manifest.spec.database.schema = schema;
        }
        Ok(manifest)
    }

    /// `--schema`, checked: it overrides the manifest's or the resource's.
    pub fn schema(&self) -> Result<Option<String>, ConfigError> {
        match &self.schema {
            Some(schema) if !crate::spec::is_schema_name(schema) => {
                Err(ConfigError::new("--schema", format!("must match {}", crate::spec::SCHEMA_NAME_PATTERN)))
            }
            other => Ok(other.clone()),
        }
    }
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Run(args) => serve::run(&cli.global, args).await,
        Command::Operator(args) => operator::run(&cli.global, args).await,
        Command::Migrate(args) => admin::migrate(&cli.global, args).await,
        Command::List(args) => admin::list(&cli.global, args).await,
        Command::Stats(args) => admin::stats(&cli.global, args).await,
        Command::Retry(args) => admin::retry(&cli.global, args).await,
        Command::RetryAll(args) => admin::retry_all(&cli.global, args).await,
        Command::Skip(args) => admin::skip(&cli.global, args).await,
        Command::Doctor(args) => doctor::doctor(&cli.global, args).await,
        Command::Status(args) => inspect::status(&cli.global, args).await,
        Command::Report(args) => inspect::report(&cli.global, args).await,
        Command::Get(args) => cluster::get(cli.global.context.as_deref(), args).await,
        Command::Completion { shell } => {
            // Installed as kubectl-txr, the script completes that name.
            let name = std::env::args_os()
                .next()
                .and_then(|arg0| std::path::Path::new(&arg0).file_stem().map(|s| s.to_string_lossy().into_owned()))
                .filter(|name| name == "kubectl-txr")
                .unwrap_or_else(|| "txrelay".to_owned());
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, name, &mut std::io::stdout());
            Ok(())
        }
        Command::Crd(args) if args.reference => {
            print!("{}", crate::operator::crd_reference());
            Ok(())
        }
        Command::Crd(_) => {
            print!("{}", crate::operator::crd_yaml().map_err(CliError::failed)?);
            Ok(())
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct CrdArgs {
    /// Print the field reference (Markdown) instead of the YAML.
    #[arg(long)]
    pub reference: bool,
}
