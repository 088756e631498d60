//! Logging: human-readable lines by default, JSON for clusters. Traces: the
//! spans of `/new` (ingest, commit, send) and of every later send, exported
//! over OTLP/HTTP (protobuf) only when the standard OpenTelemetry variables
//! ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); nothing is exported otherwise.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
    "aws_sdk_sts=info",
    "aws_smithy_http_client=info",
];

/// Flushes the exported spans when dropped (at the end of `main`).
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(Err(error)) = self.provider.take().map(|provider| provider.shutdown()) {
            eprintln!("warning: could not flush the last trace spans: {error}");
        }
    }
}

/// Whether the OpenTelemetry variables ask for traces: an OTLP endpoint is
/// set, and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`.
fn tracing_wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let endpoint = set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    endpoint && !disabled
}

/// The OTLP exporter and its provider, when asked for. Only OTLP over HTTP
/// with protobuf is built in; another protocol is refused with a warning.
fn otlp_provider() -> Option<SdkTracerProvider> {
    let var = |name: &str| std::env::var(name).ok();
    if !tracing_wanted(var) {
        return None;
    }
    let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if protocol.as_deref().is_some_and(|p| p.trim() != "http/protobuf") {
        eprintln!(
            "warning: OTEL_EXPORTER_OTLP_PROTOCOL={} is not supported (only http/protobuf): no traces are exported",
            protocol.unwrap_or_default()
        );
        return None;
    }
    use opentelemetry_otlp::WithExportConfig as _;
    // Endpoint, headers and timeout come from the OTEL_EXPORTER_OTLP_*
    // variables; the service name and resource from OTEL_SERVICE_NAME and
    // OTEL_RESOURCE_ATTRIBUTES (default service name: txrelay).
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("warning: cannot build the OTLP exporter: {error}; no traces are exported");
            return None;
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if var("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("txrelay");
    }
    Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// `RUST_LOG` overrides the default level (`info`, with the chattier
/// dependencies at `warn`). Traces are exported as [`otlp_provider`] says.
pub fn init(format: LogFormat) -> Telemetry {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT));
    for directive in CAPPED {
        if let Ok(directive) = directive.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).boxed(),
    };
    let provider = otlp_provider();
    // txrelay's own spans only: the dependencies' would flood the trace.
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer("txrelay")).with_filter(
            tracing_subscriber::filter::filter_fn(|meta| meta.is_span() && meta.target().starts_with("txrelay")),
        )
    });
    let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).try_init();
    Telemetry { provider }
}

/// Makes `span` a child of the remote span a W3C `traceparent` names (the
/// dApp's), so that a send long after the request still joins its trace.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    let mut carrier = std::collections::HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let context = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}

#[cfg(test)]
mod tests {
    use super::tracing_wanted;

    #[test]
    fn traces_are_exported_only_when_an_endpoint_is_set_and_nothing_disables_them() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        assert!(!tracing_wanted(env(&[])));
        assert!(tracing_wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")])));
        assert!(tracing_wanted(env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/v1/traces")])));
        assert!(!tracing_wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])));
        assert!(!tracing_wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), ("OTEL_SDK_DISABLED", "true")])));
        assert!(!tracing_wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), ("OTEL_TRACES_EXPORTER", "none")])));
    }
}
