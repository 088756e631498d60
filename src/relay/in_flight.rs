//! The rows this process holds under a claim and has not recorded yet:
//! released if it has to stop before their results are in.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::store::ClaimRef;

#[derive(Debug, Default)]
pub(super) struct InFlight(Mutex<HashMap<i64, ClaimRef>>);

impl InFlight {
    fn rows(&self) -> MutexGuard<'_, HashMap<i64, ClaimRef>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn track(&self, rows: impl IntoIterator<Item = ClaimRef>) {
        self.rows().extend(rows.into_iter().map(|row| (row.id, row)));
    }

    /// Stops tracking each of `rows` that is still held under that very
    /// claim, and returns those. While a backlog drains, sweeps overlap: a row
    /// one sweep gave back can be claimed again by the next before the first
    /// has finished, and the first must neither forget nor release it.
    pub fn untrack(&self, rows: impl IntoIterator<Item = ClaimRef>) -> Vec<ClaimRef> {
        let mut tracked = self.rows();
        let mut untracked = Vec::new();
        for row in rows {
            if tracked.get(&row.id) == Some(&row) {
                tracked.remove(&row.id);
                untracked.push(row);
            }
        }
        untracked
    }

    /// Every row still tracked, no longer tracked.
    pub fn take_all(&self) -> Vec<ClaimRef> {
        self.rows().drain().map(|(_, row)| row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_claimed_again_stays_tracked_under_its_new_claim() {
        let in_flight = InFlight::default();
        let first = ClaimRef { id: 7, token: Some(1) };
        let again = ClaimRef { id: 7, token: Some(2) };
        in_flight.track([first]);
        assert_eq!(in_flight.untrack([first]), vec![first], "given back by the first sweep");
        in_flight.track([again]);
        assert_eq!(in_flight.untrack([first]), vec![], "the first sweep's leftovers do not include it");
        assert_eq!(in_flight.take_all(), vec![again]);
    }

    #[test]
    fn untrack_returns_exactly_the_rows_still_held_under_their_claim() {
        let in_flight = InFlight::default();
        let rows: Vec<ClaimRef> = (1..=3).map(|id| ClaimRef { id, token: Some(9) }).collect();
        in_flight.track(rows.clone());
        assert_eq!(in_flight.untrack([rows[1]]), vec![rows[1]]);
        let mut left = in_flight.untrack(rows.clone());
        left.sort_by_key(|row| row.id);
        assert_eq!(left, vec![rows[0], rows[2]]);
        assert!(in_flight.take_all().is_empty());
    }
}
