//! The queue the relay hands transactions to. The engine speaks to it through
//! [`Queue`], so unit tests can stand in a fake; production and the
//! integration tests use [`sqs::SqsQueue`]. Only sending is ever asked of
//! the queue: `sqs:SendMessage` (which covers SendMessageBatch) is the whole
//! IAM policy a relay needs, and a real send is also how it learns that an
//! unreachable queue is back.

pub mod sqs;

use futures::future::BoxFuture;

/// SQS accepts at most 10 entries per `SendMessageBatch` call.
pub const MAX_BATCH_ENTRIES: usize = 10;
/// ... and at most this many bytes of bodies and attributes per call (also
/// the smallest per-message limit SQS has had).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// One message, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    /// The row id; also the entry id inside a batch.
    pub id: i64,
    pub body: String,
    pub idempotency_key: String,
    pub reference: String,
    pub source: String,
    /// The wallet address: the MessageGroupId on FIFO queues.
    pub group_id: String,
    /// The W3C trace context of the request that created the row, sent as
    /// the `traceparent` and `tracestate` message attributes.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl OutboundMessage {
    /// What SQS counts against its size limit: body plus attribute names and values.
    pub fn size(&self) -> usize {
        self.body.len()
            + "idempotency_key".len()
            + self.idempotency_key.len()
            + "reference".len()
            + self.reference.len()
            + "source".len()
            + self.source.len()
            + 3 * "String".len()
            + self.traceparent.as_ref().map_or(0, |t| "traceparent".len() + t.len() + "String".len())
            + self.tracestate.as_ref().map_or(0, |t| "tracestate".len() + t.len() + "String".len())
    }
}

/// What a failed send means for the rows at stake. The line between the
/// first two is the line between the queue and the message: a problem with
/// the queue, the way to it or the credentials is fixed by an operator and
/// must never cost a payment its place, while a message SQS refuses for
/// itself will be refused again however often it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The queue, the network or the credentials (a missing queue,
    /// AccessDenied, expired keys, KMS, throttling, 5xx, timeouts): the rows
    /// stay unsent, no attempt is counted, and the relay probes by sending
    /// until the queue takes messages again.
    Queue,
    /// This message can never be accepted (too large, invalid contents or
    /// attributes, a batch entry refused with `SenderFault=true`): it is
    /// dead-lettered.
    Message,
    /// This message failed this time (a batch entry refused with
    /// `SenderFault=false`): an attempt is counted and it is retried with
    /// backoff until `maxAttempts`.
    Transient,
    /// No answer to a call that was sent: it timed out, the connection was
    /// reset after the request was written, or the reply was lost. The
    /// queue may have taken the messages. Never a refusal: an attempt is
    /// counted and the row backs off, so it is sent at most `maxAttempts`
    /// times (docs/delivery.md), and the relay probes with other rows.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureScope {
    /// The whole call failed.
    Request,
    /// One entry of a batch failed; the others may have succeeded.
    Entry,
}

/// Why a send failed, without any credential in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SendFailure {
    pub kind: FailureKind,
    pub scope: FailureScope,
    /// The queue's error code, when it gave one.
    pub code: Option<String>,
    pub message: String,
}

impl SendFailure {
    /// The queue could not be reached or did not answer in time.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self { kind: FailureKind::Queue, scope: FailureScope::Request, code: None, message: message.into() }
    }

    /// This message can never be sent (found before sending it).
    pub fn message(message: impl Into<String>) -> Self {
        Self { kind: FailureKind::Message, scope: FailureScope::Request, code: None, message: message.into() }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: FailureKind::Transient, scope: FailureScope::Entry, code: None, message: message.into() }
    }

    /// A call that went out and got no answer (see [`FailureKind::Unknown`]).
    pub fn unknown(message: impl Into<String>) -> Self {
        Self { kind: FailureKind::Unknown, scope: FailureScope::Request, code: None, message: message.into() }
    }

    /// The rows stay unsent without an attempt: the queue refused the call,
    /// so nothing was sent.
    pub fn holds(&self) -> bool {
        self.kind == FailureKind::Queue
    }

    /// The queue may have taken the message (no answer came).
    pub fn is_unknown(&self) -> bool {
        self.kind == FailureKind::Unknown
    }

    /// The queue itself looks unwell: it refused the call, or did not
    /// answer. Inline sends stop and the loop probes until a send goes
    /// through.
    pub fn queue_suspect(&self) -> bool {
        matches!(self.kind, FailureKind::Queue | FailureKind::Unknown)
    }

    /// The row is dead-lettered now, whatever its attempt count.
    pub fn dead_letters(&self) -> bool {
        self.kind == FailureKind::Message
    }

    /// A whole call refused for something one bad entry can cause (too
    /// large, invalid contents): the batch is worth splitting to find it.
    pub fn may_be_one_entry(&self) -> bool {
        self.kind == FailureKind::Message && self.scope == FailureScope::Request
    }

    /// A status-condition reason (CamelCase, no dots): the error code's last
    /// part, such as `NonExistentQueue` for
    /// `AWS.SimpleQueueService.NonExistentQueue`, `SendOutcomeUnknown` for a
    /// call that got no answer, or `QueueUnreachable` when the queue gave no
    /// code (network).
    pub fn reason(&self) -> String {
        if self.kind == FailureKind::Unknown {
            return "SendOutcomeUnknown".to_owned();
        }
        let code = self.code.as_deref().and_then(|c| c.rsplit('.').next()).unwrap_or_default();
        if !code.is_empty() && code.chars().all(|c| c.is_ascii_alphanumeric()) {
            code.to_owned()
        } else {
            "QueueUnreachable".to_owned()
        }
    }
}

pub type SendResult = Result<String, SendFailure>;

pub trait Queue: Send + Sync + 'static {
    /// FIFO queues take a MessageGroupId and keep order within it.
    fn is_fifo(&self) -> bool;

    fn send<'a>(&'a self, message: &'a OutboundMessage) -> BoxFuture<'a, SendResult>;

    /// Sends up to [`MAX_BATCH_ENTRIES`] messages in one call. `Ok` holds one
    /// result per message, in the order given; `Err` means the call failed as
    /// a whole.
    fn send_batch<'a>(&'a self, messages: &'a [OutboundMessage])
    -> BoxFuture<'a, Result<Vec<SendResult>, SendFailure>>;

    /// Asks the queue about itself (GetQueueAttributes), which a send-only
    /// IAM policy does not allow: an optional early word on a missing queue
    /// or bad credentials, never a condition for sending.
    fn check(&self) -> BoxFuture<'_, Result<(), SendFailure>>;
}

/// Splits messages into batches SQS accepts: at most 10 entries and 256 KiB.
pub fn batches(messages: Vec<OutboundMessage>) -> Vec<Vec<OutboundMessage>> {
    let mut batches = Vec::new();
    let mut current: Vec<OutboundMessage> = Vec::with_capacity(MAX_BATCH_ENTRIES);
    let mut current_bytes = 0;
    for message in messages {
        let size = message.size();
        if !current.is_empty() && (current.len() == MAX_BATCH_ENTRIES || current_bytes + size > MAX_BATCH_BYTES) {
            batches.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current_bytes += size;
        current.push(message);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: usize, body_len: usize) -> OutboundMessage {
        OutboundMessage {
            id: id as i64,
            body: "x".repeat(body_len),
            idempotency_key: format!("k{id}"),
            reference: format!("r{id}"),
            source: "S".into(),
            group_id: "w".into(),
            traceparent: None,
            tracestate: None,
        }
    }

    #[test]
    fn batches_hold_at_most_ten_entries() {
        let sizes: Vec<usize> = batches((0..25).map(|i| message(i, 10)).collect()).iter().map(Vec::len).collect();
        assert_eq!(sizes, [10, 10, 5]);
    }

    #[test]
    fn batches_stay_under_the_byte_limit() {
        let sizes: Vec<usize> = batches((0..6).map(|i| message(i, 60 * 1024)).collect()).iter().map(Vec::len).collect();
        assert_eq!(sizes, [4, 2]);
    }

    #[test]
    fn batches_keep_the_order() {
        let ids: Vec<i64> =
            batches((0..12).map(|i| message(i, 1)).collect()).concat().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, (0..12).collect::<Vec<i64>>());
    }
}
