//! The group-commit task of one relay: whatever arrived while the previous
//! group committed forms the next one, and on a FIFO queue a wallet's rows
//! commit in the order their requests were taken.

use std::collections::HashSet;
use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot, watch};

use super::{Ingest, MAX_GROUP, Pending};

/// Groups committed at once, at most. Normally one: the next group is
/// whatever arrived while the previous one committed, so groups grow with
/// load on their own (BENCHMARKS.md: at 32 connections one group in flight
/// gave groups of ~10 rows and the most requests per second, two and four
/// at once fewer, every extra statement costing both processes CPU on the
/// shared cores). More go out only past [`GROUP_PATIENCE`].
pub const GROUPS_IN_FLIGHT: usize = 4;

/// How long the next group waits for the one in flight before it commits
/// beside it, on a connection of its own: far above a commit (about a
/// millisecond here, a few on a managed database), far below any request's
/// timeout. One stalled connection, or a group slowed by replays checked
/// one by one, then never holds `/new` back.
pub const GROUP_PATIENCE: std::time::Duration = std::time::Duration::from_millis(50);

/// The group-commit task of one relay: ends when the relay is dropped.
///
/// On a FIFO queue a wallet's rows must commit in the order their requests
/// were taken, or a later row could be committed, and sent, before an
/// earlier one whose group stalled. So when a group commits beside a
/// stalled one (past [`GROUP_PATIENCE`]), rows of a wallet that group holds
/// wait for it, in order, while other wallets' rows go on: new requests are
/// still taken in meanwhile, and a waiting row never holds back another
/// wallet's.
pub(super) async fn commit_groups(relay: Weak<Ingest>, mut requests: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(GROUPS_IN_FLIGHT));
    let mut previous: Option<oneshot::Receiver<()>> = None;
    // FIFO only: the wallets of groups still committing, and a counter that
    // moves whenever one of those groups ends.
    let busy = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, usize>::new()));
    let (ended, mut group_ended) = watch::channel(0_u64);
    let ended = Arc::new(ended);
    // Requests taken and not yet in a group, in arrival order.
    let mut taken: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
    let mut open = true;
    loop {
        if taken.is_empty() {
            match requests.recv().await {
                Some(first) => taken.push_back(first),
                None => return,
            }
        }
        // Whatever arrives while the previous group commits (or while every
        // slot is busy) joins this group.
        if let Some(previous) = previous.take() {
            let _ = tokio::time::timeout(GROUP_PATIENCE, previous).await;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        while let Ok(next) = requests.try_recv() {
            taken.push_back(next);
        }
        let Some(relay) = relay.upgrade() else { return };
        let fifo = relay.core.is_fifo();
        let group = if fifo {
            group_ended.borrow_and_update();
            take_free_wallets(&mut taken, &busy.lock().unwrap_or_else(|e| e.into_inner()), MAX_GROUP)
        } else {
            taken.drain(..taken.len().min(MAX_GROUP)).collect()
        };
        if group.is_empty() {
            // Every row taken waits for a group still committing (each is
            // bounded by the store's call timeout): wait for one to end,
            // taking new requests meanwhile, which may be free to go.
            drop(slot);
            drop(relay);
            tokio::select! {
                _ = group_ended.changed() => {}
                next = requests.recv(), if open => match next {
                    Some(next) => taken.push_back(next),
                    None => open = false,
                },
            }
            continue;
        }
        relay.waiting.send_modify(|n| *n = n.saturating_sub(group.len()));
        relay.core.metrics.ingest_group(group.len());
        let wallets: Vec<String> =
            if fifo { group.iter().map(|p| p.tx.wallet_address.clone()).collect() } else { Vec::new() };
        let held = WalletsHeld::hold(busy.clone(), ended.clone(), wallets);
        let (committed, done) = oneshot::channel::<()>();
        previous = Some(done);
        tokio::spawn(async move {
            // Released on every exit, a panic included: a wallet left
            // marked busy would hold its rows forever.
            let held = held;
            relay.commit_group(group).await;
            // Released before the intake is woken, so it sees the wallets free.
            drop(held);
            drop(slot);
            drop(committed);
        });
    }
}

/// The wallets of one group in flight, marked busy until it is dropped.
struct WalletsHeld {
    busy: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    ended: Arc<watch::Sender<u64>>,
    wallets: Vec<String>,
}

impl WalletsHeld {
    fn hold(
        busy: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
        ended: Arc<watch::Sender<u64>>,
        wallets: Vec<String>,
    ) -> Self {
        {
            let mut busy = busy.lock().unwrap_or_else(|e| e.into_inner());
            for wallet in &wallets {
                *busy.entry(wallet.clone()).or_default() += 1;
            }
        }
        Self { busy, ended, wallets }
    }
}

impl Drop for WalletsHeld {
    fn drop(&mut self) {
        if self.wallets.is_empty() {
            return;
        }
        {
            let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            for wallet in self.wallets.drain(..) {
                if let std::collections::hash_map::Entry::Occupied(mut entry) = busy.entry(wallet) {
                    *entry.get_mut() -= 1;
                    if *entry.get() == 0 {
                        entry.remove();
                    }
                }
            }
        }
        self.ended.send_modify(|n| *n += 1);
    }
}

/// Takes from `taken`, in arrival order, up to `max` rows whose wallet no
/// group in flight holds; a row whose wallet waits keeps every later row of
/// that wallet waiting behind it. What is not taken stays, in order.
fn take_free_wallets(
    taken: &mut std::collections::VecDeque<Pending>,
    busy: &std::collections::HashMap<String, usize>,
    max: usize,
) -> Vec<Pending> {
    let mut waiting_wallets = HashSet::new();
    let mut group = Vec::with_capacity(max.min(taken.len()));
    let mut rest = std::collections::VecDeque::with_capacity(taken.len());
    for pending in taken.drain(..) {
        let wallet = &pending.tx.wallet_address;
        if group.len() < max && !busy.contains_key(wallet) && !waiting_wallets.contains(wallet) {
            group.push(pending);
        } else {
            waiting_wallets.insert(wallet.clone());
            rest.push_back(pending);
        }
    }
    *taken = rest;
    group
}
