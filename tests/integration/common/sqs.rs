use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};

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
    /// passed; deleting as it goes keeps moto fast.
    pub async fn receive(&self, count: usize, timeout: Duration) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::new();
        while messages.len() < count && Instant::now() < deadline {
            let batch = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages((count - messages.len()).min(10) as i32)
                .wait_time_seconds(1)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await
                .expect("receive from moto");
            for message in batch.messages.unwrap_or_default() {
                if let Some(handle) = &message.receipt_handle {
                    self.client
                        .delete_message()
                        .queue_url(&self.url)
                        .receipt_handle(handle)
                        .send()
                        .await
                        .expect("delete");
                }
                messages.push(message);
            }
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
