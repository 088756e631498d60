//! Records message ids. Under load many sends finish at about the same time
//! (inline sends of concurrent requests, batches of a sweep); instead of one
//! UPDATE and one commit each, whatever arrived while the previous UPDATE ran
//! is written by the next one. No timer: a lone send is written at once.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use crate::store::{ClaimRef, Store, StoreError};
use crate::transaction::Transaction;

/// Rows beyond which the writer stops gathering more for one UPDATE.
const MAX_ROWS: usize = 1000;

type Reply = oneshot::Sender<Result<Vec<Transaction>, StoreError>>;

#[derive(Debug, Clone)]
pub struct SentRecorder {
    requests: mpsc::UnboundedSender<(Vec<(ClaimRef, String)>, Reply)>,
}

impl SentRecorder {
    pub fn start(store: Store) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(store, receiver));
        Self { requests }
    }

    /// Records `(row, message id)` pairs; returns the rows as they now
    /// are, without those another process recorded first or claimed since.
    pub async fn record(&self, sent: Vec<(ClaimRef, String)>) -> Result<Vec<Transaction>, StoreError> {
        let stopped = || StoreError::Unavailable("the message id recorder stopped".into());
        let (reply, answer) = oneshot::channel();
        self.requests.send((sent, reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(store: Store, mut receiver: mpsc::UnboundedReceiver<(Vec<(ClaimRef, String)>, Reply)>) {
    while let Some(first) = receiver.recv().await {
        let mut requests = vec![first];
        let mut rows = requests[0].0.len();
        while rows < MAX_ROWS {
            match receiver.try_recv() {
                Ok(request) => {
                    rows += request.0.len();
                    requests.push(request);
                }
                Err(_) => break,
            }
        }
        let sent: Vec<(ClaimRef, String)> = requests.iter().flat_map(|(sent, _)| sent.iter().cloned()).collect();
        match store.record_sent(&sent).await {
            Ok(recorded) => {
                let mut recorded: HashMap<i64, Transaction> = recorded.into_iter().map(|row| (row.id, row)).collect();
                for (sent, reply) in requests {
                    let rows = sent.iter().filter_map(|(row, _)| recorded.remove(&row.id)).collect();
                    let _ = reply.send(Ok(rows));
                }
            }
            Err(error) => {
                let text = error.to_string();
                let unavailable = error.is_unavailable();
                for (_, reply) in requests {
                    let error = if unavailable {
                        StoreError::Unavailable(text.clone())
                    } else {
                        StoreError::Query(text.clone())
                    };
                    let _ = reply.send(Err(error));
                }
            }
        }
    }
}
