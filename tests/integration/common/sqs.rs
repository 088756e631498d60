use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName, QueueAttributeName};

pub const REGION: &str = "us-east-1";
pub const ACCESS_KEY: &str = "testing-access-key";
pub const SECRET_KEY: &str = "testing-secret-key";

/// A queue of its own on the moto server.
pub struct TestQueue {
    pub endpoint: String,
    pub url: String,
    pub client: Client,
}

impl TestQueue {
    pub async fn standard() -> Self {
        Self::create(false, HashMap::new()).await
    }

    pub async fn fifo() -> Self {
        Self::create(true, HashMap::new()).await
    }

    pub async fn create(fifo: bool, mut attributes: HashMap<QueueAttributeName, String>) -> Self {
        let endpoint = super::required_env("TXRELAY_TEST_SQS_ENDPOINT");
        let client = client(&endpoint);
        let mut name = format!("q-{}-{}", std::process::id(), fastrand::u64(..));
        if fifo {
            name.push_str(".fifo");
            attributes.insert(QueueAttributeName::FifoQueue, "true".into());
        }
        let created = client
            .create_queue()
            .queue_name(&name)
            .set_attributes(Some(attributes))
            .send()
            .await
            .expect("moto creates the queue");
        let url = created.queue_url.expect("queue url");
        Self { endpoint, url, client }
    }

    /// Receives and deletes until `count` messages arrived or `timeout`
    /// passed; deleting as it goes (ten at a time) keeps moto fast.
    pub async fn receive(&self, count: usize, timeout: Duration) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::new();
        while messages.len() < count && Instant::now() < deadline {
            messages.extend(self.receive_batch(count - messages.len()).await);
        }
        messages
    }

    /// Receives with `receivers` concurrent long polls until `count` distinct
    /// messages arrived or `timeout` passed. moto's cost per call grows with
    /// the queue's depth (every send and receive walks the whole queue), so a
    /// volume test must take messages out as fast as the relays put them in:
    /// a queue that fills up slows everything quadratically. Concurrent
    /// receivers can be handed one message twice (a standard queue is
    /// at-least-once); such redeliveries, same message id, are kept once.
    pub async fn receive_concurrently(&self, count: usize, timeout: Duration, receivers: usize) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        let received = std::sync::Mutex::new(HashMap::<String, Message>::with_capacity(count));
        let done = || received.lock().unwrap().len() >= count || Instant::now() >= deadline;
        let receiver = || async {
            while !done() {
                let batch = self.receive_batch(10).await;
                let mut received = received.lock().unwrap();
                for message in batch {
                    let id = message.message_id.clone().expect("message id");
                    received.entry(id).or_insert(message);
                }
            }
        };
        futures::future::join_all((0..receivers.max(1)).map(|_| receiver())).await;
        received.into_inner().unwrap().into_values().collect()
    }

    /// One long poll (at most 1 s) for up to `max` (≤ 10) messages, deleted
    /// with one DeleteMessageBatch call.
    async fn receive_batch(&self, max: usize) -> Vec<Message> {
        let batch = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive from moto");
        let messages = batch.messages.unwrap_or_default();
        let entries: Vec<DeleteMessageBatchRequestEntry> = messages
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let handle = m.receipt_handle.as_deref()?;
                DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(handle).build().ok()
            })
            .collect();
        if !entries.is_empty() {
            // An entry moto refuses (ReceiptHandleIsInvalid: two concurrent
            // receivers were handed the same message and the other one
            // deleted it first) is harmless: receivers dedupe by message id.
            self.client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .expect("delete from moto");
        }
        messages
    }

    /// Whatever is in the queue now (short poll until empty).
    pub async fn drain(&self) -> Vec<Message> {
        let mut all = Vec::new();
        loop {
            let got = self.receive(10, Duration::from_millis(1200)).await;
            if got.is_empty() {
                return all;
            }
            all.extend(got);
        }
    }
}

pub fn client(endpoint: &str) -> Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
        .build();
    Client::from_conf(config)
}

pub fn attribute(message: &Message, name: &str) -> Option<String> {
    message.message_attributes.as_ref()?.get(name)?.string_value.clone()
}
