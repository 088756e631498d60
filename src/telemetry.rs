//! Logging: human-readable lines by default, JSON for clusters.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

const DEFAULT: &str = "info,sqlx=warn,aws_config=warn,aws_smithy_runtime=warn,kube=warn,tower=warn";

/// The AWS SDK prints credential identifiers in its debug output, so its
/// crates never log below `info`, whatever `RUST_LOG` asks for.
const CAPPED: &[&str] = &[
    "aws_smithy_runtime=info",
    "aws_smithy_runtime_api=info",
    "aws_runtime=info",
    "aws_config=info",
    "aws_sdk_sqs=info",
];

/// `RUST_LOG` overrides the default level (`info`, with the chattier
/// dependencies at `warn`).
pub fn init(format: LogFormat) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT));
    for directive in CAPPED {
        if let Ok(directive) = directive.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}
