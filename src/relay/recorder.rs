//! Records the message ids of inline sends. Under load many requests finish
//! their send at about the same time; instead of one UPDATE and one commit
//! each, whatever arrived while the previous UPDATE ran is written by the
//! next one. No timer: a lone request is written at once.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use crate::store::{Store, StoreError};
use crate::transaction::Transaction;

/// Largest number of rows one UPDATE records.
const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<Option<Transaction>, StoreError>>;

#[derive(Debug, Clone)]
pub struct SentRecorder {
    requests: mpsc::UnboundedSender<(i64, String, Reply)>,
}

impl SentRecorder {
    pub fn start(store: Store) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(store, receiver));
        Self { requests }
    }

    /// The row after its message id is recorded; `None` when another
    /// process recorded it first.
    pub async fn record(&self, id: i64, message_id: String) -> Result<Option<Transaction>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((id, message_id, reply))
            .map_err(|_| StoreError::Unavailable("the message id recorder stopped".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("the message id recorder stopped".into()))?
    }
}

async fn run(store: Store, mut receiver: mpsc::UnboundedReceiver<(i64, String, Reply)>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let sent: Vec<(i64, String)> = batch.iter().map(|(id, message_id, _)| (*id, message_id.clone())).collect();
        match store.record_sent(&sent).await {
            Ok(rows) => {
                let mut rows: HashMap<i64, Transaction> = rows.into_iter().map(|row| (row.id, row)).collect();
                for (id, _, reply) in batch.drain(..) {
                    let _ = reply.send(Ok(rows.remove(&id)));
                }
            }
            Err(error) => {
                let text = error.to_string();
                let unavailable = error.is_unavailable();
                for (_, _, reply) in batch.drain(..) {
                    let error =
                        if unavailable { StoreError::Unavailable(text.clone()) } else { StoreError::Query(text.clone()) };
                    let _ = reply.send(Err(error));
                }
            }
        }
    }
}
