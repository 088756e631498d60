//! The queue the relay hands transactions to. The engine speaks to it through
//! [`Queue`], so unit tests can stand in a fake; production and the
//! integration tests use [`sqs::SqsQueue`].

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
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Throttling, server errors, timeouts, unreachable queue: try again later.
    Transient,
    /// The message or the queue itself is wrong: retrying cannot help.
    Permanent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureScope {
    /// The whole call failed: the queue (or the way to it) is the problem.
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
    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: FailureKind::Transient, scope: FailureScope::Request, code: None, message: message.into() }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self { kind: FailureKind::Permanent, scope: FailureScope::Request, code: None, message: message.into() }
    }

    pub fn is_permanent(&self) -> bool {
        self.kind == FailureKind::Permanent
    }

    /// A request-level permanent failure that one bad entry can cause (too
    /// large, invalid contents): the batch is worth splitting to find it.
    pub fn may_be_one_entry(&self) -> bool {
        self.is_permanent()
            && self.scope == FailureScope::Request
            && !matches!(self.code.as_deref(), Some(code) if sqs::is_queue_missing(code))
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

    /// A cheap call that succeeds when the queue can be reached.
    fn probe(&self) -> BoxFuture<'_, Result<(), SendFailure>>;
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
