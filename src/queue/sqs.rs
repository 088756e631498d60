//! Amazon SQS (or anything that speaks its API, such as moto in the tests).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use aws_config::sts::AssumeRoleProvider;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::SharedCredentialsProvider;
use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::config::timeout::TimeoutConfig;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use futures::future::BoxFuture;

use super::{FailureKind, FailureScope, OutboundMessage, Queue, SendFailure, SendResult};
use crate::secret::Secret;

/// Where the queue is and how to sign requests to it.
#[derive(Debug, Clone)]
pub struct SqsSettings {
    pub queue_url: String,
    pub region: String,
    /// A local SQS-compatible server instead of AWS.
    pub endpoint_url: Option<String>,
    /// STS for `role_arn` (default: the region's AWS endpoint).
    pub sts_endpoint_url: Option<String>,
    /// Static credentials; without them the default AWS chain (environment,
    /// web identity, instance profile) is used.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// Assume this role (with this external id) from the credentials above.
    pub role_arn: Option<String>,
    pub external_id: Option<String>,
    /// Names the relay in the role's session (CloudTrail shows it).
    pub session_name: String,
    pub delay_seconds: u32,
    /// Ceiling on one call, so a hung connection cannot outlive a claim lease.
    pub call_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SqsConfigError {
    #[error("{0}")]
    Invalid(&'static str),
}

pub struct SqsQueue {
    client: Client,
    queue_url: String,
    fifo: bool,
    delay_seconds: Option<i32>,
}

impl SqsQueue {
    pub async fn new(settings: &SqsSettings) -> Result<Self, SqsConfigError> {
        let fifo = crate::spec::QueueKind::of_url(&settings.queue_url).is_fifo();
        if fifo && settings.delay_seconds > 0 {
            return Err(SqsConfigError::Invalid(
                "spec.delaySeconds must be 0 for a FIFO queue (set the delay on the queue instead)",
            ));
        }
        if settings.queue_url.is_empty() {
            return Err(SqsConfigError::Invalid("the queue URL is empty"));
        }
        if settings.region.is_empty() {
            return Err(SqsConfigError::Invalid("the AWS region is empty"));
        }
        // The relay's own loop retries with backoff and knows which rows are
        // at stake; SDK-level retries would only hide failures and stretch calls.
        let loader = || {
            let mut loader = aws_config::defaults(BehaviorVersion::latest())
                .region(Region::new(settings.region.clone()))
                .retry_config(RetryConfig::standard().with_max_attempts(1))
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(2).min(settings.call_timeout))
                        .operation_timeout(settings.call_timeout)
                        .build(),
                );
            if let (Some(id), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key) {
                loader = loader.credentials_provider(Credentials::new(id, secret.expose(), None, None, "txrelay"));
            }
            loader
        };
        if settings.access_key_id.is_some() != settings.secret_access_key.is_some() {
            return Err(SqsConfigError::Invalid(
                "accessKeyId and secretAccessKey must be given together (or neither, for the default AWS chain)",
            ));
        }
        let mut sqs = loader();
        if let Some(endpoint) = &settings.endpoint_url {
            sqs = sqs.endpoint_url(endpoint);
        }
        let mut config = sqs.load().await;
        if let Some(role) = &settings.role_arn {
            // STS from the base identity, at STS's own endpoint: the SQS
            // endpoint (a VPC endpoint, say) does not answer AssumeRole.
            // The SDK's identity cache refreshes the role's credentials
            // before they expire (they last an hour).
            let mut sts = loader();
            if let Some(endpoint) = &settings.sts_endpoint_url {
                sts = sts.endpoint_url(endpoint);
            }
            let mut assume = AssumeRoleProvider::builder(role.clone()).session_name(settings.session_name.clone());
            if let Some(id) = &settings.external_id {
                assume = assume.external_id(id.clone());
            }
            let provider = assume.configure(&sts.load().await).build().await;
            config = config.into_builder().credentials_provider(SharedCredentialsProvider::new(provider)).build();
        }
        Ok(Self {
            client: Client::new(&config),
            queue_url: settings.queue_url.clone(),
            fifo,
            delay_seconds: (!fifo).then(|| i32::try_from(settings.delay_seconds).unwrap_or(0)),
        })
    }

    fn attributes(message: &OutboundMessage) -> Result<HashMap<String, MessageAttributeValue>, SendFailure> {
        let mut attributes = HashMap::with_capacity(5);
        let trace = [("traceparent", &message.traceparent), ("tracestate", &message.tracestate)];
        let trace = trace.into_iter().filter_map(|(name, value)| Some((name, value.as_ref()?)));
        for (name, value) in [
            ("idempotency_key", &message.idempotency_key),
            ("reference", &message.reference),
            ("source", &message.source),
        ]
        .into_iter()
        .chain(trace)
        {
            let value = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
                .map_err(|e| SendFailure::message(format!("message attribute {name}: {e}")))?;
            attributes.insert(name.to_owned(), value);
        }
        Ok(attributes)
    }

    /// One test message (`txrelay doctor --send-test`), marked with the
    /// attribute `txrelay_doctor = true` for consumers to drop.
    pub async fn send_test(&self) -> SendResult {
        let marker = MessageAttributeValue::builder()
            .data_type("String")
            .string_value("true")
            .build()
            .map_err(|e| SendFailure::message(format!("message attribute txrelay_doctor: {e}")))?;
        let sent_at = chrono::Utc::now();
        let mut request = self
            .client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(format!("{{\"txrelay_doctor\":true,\"sent_at\":\"{}\"}}", sent_at.to_rfc3339()))
            .message_attributes("txrelay_doctor", marker);
        if self.fifo {
            request = request
                .message_group_id("txrelay-doctor")
                .message_deduplication_id(format!("txrelay-doctor-{}", sent_at.timestamp_millis()));
        }
        let output = request.send().await.map_err(classify)?;
        output.message_id.ok_or_else(|| SendFailure::transient("SendMessage answered without a message id"))
    }

    async fn send_one(&self, message: &OutboundMessage) -> SendResult {
        let mut request = self
            .client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(&message.body)
            .set_message_attributes(Some(Self::attributes(message)?))
            .set_delay_seconds(self.delay_seconds);
        if self.fifo {
            request = request
                .message_group_id(fifo_id(&message.group_id))
                .message_deduplication_id(fifo_id(&message.idempotency_key));
        }
        let output = request.send().await.map_err(classify)?;
        output.message_id.ok_or_else(|| SendFailure::transient("SendMessage answered without a message id"))
    }

    async fn send_many(&self, messages: &[OutboundMessage]) -> Result<Vec<SendResult>, SendFailure> {
        let mut entries = Vec::with_capacity(messages.len());
        for message in messages {
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(message.id.to_string())
                .message_body(&message.body)
                .set_message_attributes(Some(Self::attributes(message)?))
                .set_delay_seconds(self.delay_seconds);
            if self.fifo {
                entry = entry
                    .message_group_id(fifo_id(&message.group_id))
                    .message_deduplication_id(fifo_id(&message.idempotency_key));
            }
            entries.push(entry.build().map_err(|e| SendFailure::message(format!("batch entry: {e}")))?);
        }
        let output = self
            .client
            .send_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(classify)?;
        let mut results: HashMap<&str, SendResult> = HashMap::with_capacity(messages.len());
        for ok in output.successful() {
            results.insert(ok.id(), Ok(ok.message_id().to_owned()));
        }
        let entry_ids: Vec<String> = messages.iter().map(|m| m.id.to_string()).collect();
        for failed in output.failed() {
            let kind = if is_queue_code(failed.code()) {
                FailureKind::Queue
            } else if failed.sender_fault() {
                FailureKind::Message
            } else {
                FailureKind::Transient
            };
            results.insert(
                failed.id(),
                Err(SendFailure {
                    kind,
                    scope: FailureScope::Entry,
                    code: Some(failed.code().to_owned()),
                    message: format!("{}: {}", failed.code(), failed.message().unwrap_or("batch entry failed")),
                }),
            );
        }
        Ok(entry_ids
            .iter()
            .map(|id| {
                results
                    .remove(id.as_str())
                    .unwrap_or_else(|| Err(SendFailure::transient("SendMessageBatch gave no result for this entry")))
            })
            .collect())
    }
}

impl Queue for SqsQueue {
    fn is_fifo(&self) -> bool {
        self.fifo
    }

    fn send<'a>(&'a self, message: &'a OutboundMessage) -> BoxFuture<'a, SendResult> {
        Box::pin(self.send_one(message))
    }

    fn send_batch<'a>(
        &'a self,
        messages: &'a [OutboundMessage],
    ) -> BoxFuture<'a, Result<Vec<SendResult>, SendFailure>> {
        Box::pin(self.send_many(messages))
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SendFailure>> {
        Box::pin(async move {
            self.client
                .get_queue_attributes()
                .queue_url(&self.queue_url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .map_err(classify)?;
            Ok(())
        })
    }
}

/// The caller may not ask this (IAM): says nothing about the queue.
pub fn is_not_allowed(code: &str) -> bool {
    code.starts_with("AccessDenied") || code == "AuthorizationError" || code == "UnauthorizedOperation"
}

/// SQS's rule for MessageGroupId and MessageDeduplicationId: 1-128 ASCII
/// letters, digits and punctuation. A wallet address or idempotency key that
/// fits is sent as it is; one that does not (a space, non-ASCII letters, more
/// than 128 characters) is sent as the hex SHA-256 of its UTF-8 bytes, which
/// always fits. Each value maps to one id, so deduplication and per-wallet
/// order hold exactly as for any other value; `/new` accepts both kinds.
pub fn fifo_id(value: &str) -> Cow<'_, str> {
    let fits = (1..=128).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b.is_ascii_punctuation());
    if fits {
        Cow::Borrowed(value)
    } else {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(value.as_bytes());
        Cow::Owned(crate::hex::lower(&digest))
    }
}

/// Error codes about the queue, the account or the credentials rather than
/// the message, when SQS gives them for one batch entry.
fn is_queue_code(code: &str) -> bool {
    let code = code.rsplit('.').next().unwrap_or(code);
    code.starts_with("Kms")
        || code.starts_with("KMS")
        || code.starts_with("AccessDenied")
        || code.contains("Throttl")
        || matches!(
            code,
            "NonExistentQueue"
                | "QueueDoesNotExist"
                | "RequestThrottled"
                | "InvalidClientTokenId"
                | "ExpiredToken"
                | "UnrecognizedClientException"
                | "SignatureDoesNotMatch"
                | "InvalidSecurity"
                | "OverLimit"
        )
}

/// Error codes that one message can cause (too large, invalid contents or
/// attributes): a batch refused with one of them is split to find the
/// culprit, and a single message refused with one is dead-lettered.
/// Everything else SQS says about a whole call concerns the queue.
fn is_message_code(code: &str) -> bool {
    let code = code.rsplit('.').next().unwrap_or(code);
    matches!(
        code,
        "InvalidParameterValue"
            | "InvalidMessageContents"
            | "MessageTooLong"
            | "BatchRequestTooLong"
            | "InvalidAttributeName"
            | "InvalidAttributeValue"
            | "MissingParameter"
    )
}

/// A whole call that failed concerns the queue (held, no attempt), unless
/// SQS named something one message can cause, or answered with a server
/// error (5xx, 408) that is not a known refusal: AWS documents those as
/// "may or may not have been processed", and a gateway that forwarded the
/// call and then timed out answers 502/504. Those are unknown outcomes.
fn classify<E>(error: SdkError<E, aws_sdk_sqs::config::http::HttpResponse>) -> SendFailure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let SdkError::ServiceError(service) = &error {
        let code = service.err().code().map(str::to_owned);
        let status = service.raw().status().as_u16();
        let kind = match code.as_deref() {
            Some(code) if is_message_code(code) => FailureKind::Message,
            Some(code) if is_queue_code(code) => FailureKind::Queue,
            _ if status >= 500 || status == 408 => FailureKind::Unknown,
            _ => FailureKind::Queue,
        };
        let message = format!(
            "{}: {}",
            code.as_deref().unwrap_or("ServiceError"),
            service.err().message().unwrap_or("no message")
        );
        return SendFailure { kind, scope: FailureScope::Request, code, message };
    }
    let text = truncate(DisplayErrorContext(&error).to_string(), 500);
    if never_sent(&error, &text) { SendFailure::unreachable(text) } else { SendFailure::unknown(text) }
}

/// Whether a call that got no answer is known not to have reached the
/// queue: it was never built, or its connection was never made (refused,
/// no route, DNS, a connect or TLS-handshake timeout). Anything after that
/// (a timeout while waiting for the answer, a reset after the request was
/// written, a reply that could not be read) may have been acted on.
fn never_sent<E>(error: &SdkError<E, aws_sdk_sqs::config::http::HttpResponse>, text: &str) -> bool {
    match error {
        SdkError::ConstructionFailure(_) => true,
        // Credentials are resolved before the request is signed: however
        // that failed (STS refused, timed out, no identity), nothing went
        // to SQS.
        SdkError::DispatchFailure(failure)
            if failure.as_connector_error().is_some_and(|connector| credentials_failed(connector)) =>
        {
            true
        }
        SdkError::DispatchFailure(_) => {
            let text = text.to_ascii_lowercase();
            // hyper-util's connector reports a failed connection as
            // "client error (Connect)"; smithy's as "connect timeout".
            // The provider's own words, should its error type be wrapped
            // where the chain above cannot see it.
            [
                "(connect)",
                "tcp connect error",
                "connect timeout",
                "dns error",
                "connection refused",
                "handshake",
                "while loading credentials",
            ]
            .iter()
            .any(|marker| text.contains(marker))
        }
        _ => false,
    }
}

/// Whether a credentials provider's error is in the error's source chain.
fn credentials_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<aws_credential_types::provider::error::CredentialsError>() {
            return true;
        }
        next = error.source();
    }
    false
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_one_message_can_cause_is_about_the_message() {
        for code in ["InvalidParameterValue", "InvalidMessageContents", "MessageTooLong", "BatchRequestTooLong"] {
            assert!(is_message_code(code), "{code}");
        }
        for code in [
            "AWS.SimpleQueueService.NonExistentQueue",
            "AccessDenied",
            "KmsAccessDenied",
            "RequestThrottled",
            "InvalidClientTokenId",
            "ExpiredToken",
        ] {
            assert!(!is_message_code(code), "{code}");
            assert!(is_queue_code(code), "{code}: about the queue even for one entry");
        }
        // A batch entry refused for a passing reason is retried as itself.
        assert!(!is_queue_code("InternalError") && !is_message_code("InternalError"));
    }

    #[test]
    fn a_call_that_went_out_and_got_no_answer_is_unknown_and_a_refused_connection_is_not() {
        use aws_sdk_sqs::config::http::HttpResponse;
        use aws_sdk_sqs::error::ConnectorError;
        type Error = SdkError<aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError, HttpResponse>;
        let io = |kind, text: &str| ConnectorError::io(Box::new(std::io::Error::new(kind, text.to_owned())));
        let refused: Error = SdkError::dispatch_failure(io(
            std::io::ErrorKind::ConnectionRefused,
            "client error (Connect): tcp connect error: Connection refused (os error 111)",
        ));
        assert_eq!(classify(refused).kind, FailureKind::Queue, "never connected: nothing was sent");
        let reset: Error = SdkError::dispatch_failure(io(
            std::io::ErrorKind::ConnectionReset,
            "connection closed before message completed",
        ));
        assert_eq!(classify(reset).kind, FailureKind::Unknown, "reset after the request was written");
        let timeout: Error = SdkError::timeout_error("operation timed out");
        let failure = classify(timeout);
        assert_eq!(failure.kind, FailureKind::Unknown, "no answer in time");
        assert_eq!(failure.reason(), "SendOutcomeUnknown");
        assert!(!failure.holds() && failure.queue_suspect() && !failure.dead_letters());
    }

    #[test]
    fn fifo_ids_always_fit_and_each_value_keeps_one_id() {
        assert_eq!(fifo_id("7xKX-wallet_1.a/b"), "7xKX-wallet_1.a/b", "a fitting value is sent as it is");
        let valid = |id: &str| {
            (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b.is_ascii_punctuation())
        };
        let long = "k".repeat(150);
        for value in ["has a space", long.as_str(), "clé-ключ", "", "tab\there"] {
            let id = fifo_id(value);
            assert!(valid(&id), "{value:?} -> {id:?}");
            assert_eq!(id.len(), 64, "hex SHA-256");
            assert_eq!(fifo_id(value), id, "one value, one id");
        }
        assert_ne!(fifo_id("a b"), fifo_id("a  b"));
        assert!(valid(&fifo_id(&"k".repeat(128))) && fifo_id(&"k".repeat(128)).len() == 128);
    }
}
