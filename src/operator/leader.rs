//! Leader election on a `coordination.k8s.io` Lease, with get/create/update
//! only (optimistic concurrency on resourceVersion), so the ClusterRole needs
//! nothing more. Every replica relays and serves `/new`; only the leader
//! writes status and publishes Events.
//!
//! Why not kube-lease-manager: it is the kept library for this, but it takes
//! and renews the Lease by server-side apply (`patch`), which the operator's
//! least-privilege ClusterRole does not grant, and all that is needed here is
//! one function. What matters from client-go is kept: a Lease held by another
//! replica is judged expired by *this* replica's clock, from the moment it
//! last saw the Lease change, never by comparing the holder's `renewTime`
//! with the local clock, so clock skew between nodes cannot move a handover.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The Lease record as last seen (holder and resourceVersion) and when,
    /// on this replica's monotonic clock.
    observed: std::sync::Mutex<Option<(String, String, Instant)>>,
}

impl LeaderElector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: std::sync::Mutex::new(None),
        }
    }

    /// One round: take the lease if it is free or expired, renew it if held.
    /// Returns whether this replica leads now.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(self.spec(now, now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
        let expired = spec.renew_time.is_none() || self.unchanged_for(holder, &lease, duration);
        let transitions = spec.lease_transitions.unwrap_or(0);
        let next = if holder == self.identity {
            self.spec(spec.acquire_time.map_or(now, |t| t.0), now, transitions)
        } else if holder.is_empty() || expired {
            self.spec(now, now, transitions + 1)
        } else {
            return Ok(false);
        };
        lease.spec = Some(next);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            // Someone else wrote the lease first: theirs wins this round.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Whether the Lease has stayed as this replica last saw it for longer
    /// than `duration`, by the local monotonic clock: a holder that renews
    /// changes its resourceVersion, whatever its clock says.
    fn unchanged_for(&self, holder: &str, lease: &Lease, duration: Duration) -> bool {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let now = Instant::now();
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match observed.as_ref() {
            Some((h, v, at)) if h == holder && *v == version => now.duration_since(*at) > duration,
            _ => {
                *observed = Some((holder.to_owned(), version, now));
                false
            }
        }
    }

    fn spec(&self, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(15)),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Gives the lease up so another replica can lead at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let held = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.identity.as_str());
            if held {
                if let Some(spec) = lease.spec.as_mut() {
                    spec.holder_identity = None;
                    spec.renew_time = None;
                }
                let _ = self.api.replace(&self.name, &PostParams::default(), &lease).await;
            }
        }
    }

    /// Renews every third of the lease duration and publishes leadership.
    pub async fn run(self, leading: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let period = self.duration / 3;
        loop {
            // A renewal that hangs must not leave this replica believing it
            // leads after its lease ran out: it gets a third of the lease.
            let now_leading = match tokio::time::timeout(period, self.try_lead()).await {
                Ok(Ok(leading)) => leading,
                Ok(Err(error)) => {
                    warn!(%error, "leader election failed; acting as a follower");
                    false
                }
                Err(_) => {
                    warn!("leader election timed out; acting as a follower");
                    false
                }
            };
            if *leading.borrow() != now_leading {
                info!(identity = %self.identity, leading = now_leading, "leadership changed");
                let _ = leading.send(now_leading);
            }
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                _ = stop.changed() => break,
            }
        }
        if *leading.borrow() {
            self.release().await;
            let _ = leading.send(false);
        }
    }
}
