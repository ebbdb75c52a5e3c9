//! The watch loop: keeps a client's trust state current from the broker's `Watch` stream,
//! reconnecting with capped backoff and resuming from the last sequence it saw.

use std::sync::Arc;
use std::time::Duration;

use sigil_proto::v1 as pb;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::source::SourceEvent;
use crate::{WorkloadClient, X509Svid};

/// What the loop reports to its owner.
#[derive(Debug, Clone)]
pub(crate) struct Hooks {
    /// Poked when this workload's credentials must be renewed now.
    pub renew_now: Arc<Notify>,
    /// Where events go.
    pub events: broadcast::Sender<SourceEvent>,
}

/// A random fraction in [0, 1), for jitter.
pub(crate) fn jitter() -> f64 {
    let b = sigil_pki::ids::random_bytes::<8>();
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Capped exponential backoff with ±20% jitter: attempt 1 waits about `initial`.
pub(crate) fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let base = initial
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(20)))
        .min(max);
    base.mul_f64(0.8 + 0.4 * jitter())
}

fn own_revoked(svid: &X509Svid, r: &pb::Revocations) -> Option<String> {
    if r.credentials
        .iter()
        .any(|c| c.credential_id.eq_ignore_ascii_case(&svid.serial))
    {
        return Some("this workload's certificate was revoked".into());
    }
    if r.floors
        .iter()
        .any(|f| f.spiffe_id == svid.spiffe_id.as_str() && f.min_generation > svid.generation)
    {
        return Some("this workload's identity had its credentials revoked".into());
    }
    None
}

/// Runs until `cancel`. `svids` ticks when the workload's SVID changes (the stream is then
/// reopened with the new certificate so directives addressed to it arrive).
pub(crate) async fn run(
    client: WorkloadClient,
    hooks: Hooks,
    mut svids: watch::Receiver<Option<Arc<X509Svid>>>,
    cancel: CancellationToken,
) {
    let mut since = 0u64;
    let mut failures = 0u32;
    loop {
        // The stream opens with the current certificate: a change before now is not a reason
        // to reopen it.
        svids.borrow_and_update();
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            s = client.watch(since) => s,
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Refused for who we are: our certificate was revoked (or expired) while the
                // stream was down, so its notice could not reach us. Renew now (the renewal is
                // refused too, and the source attests again) instead of waiting for the
                // schedule, which for a long-lived certificate is far off.
                if e.kind() == crate::ErrorKind::Reattest {
                    let _ = hooks.events.send(SourceEvent::Revoked {
                        reason: format!("the broker refused this workload's watch stream: {e}"),
                    });
                    hooks.renew_now.notify_one();
                }
                failures += 1;
                let wait = backoff(
                    failures,
                    Duration::from_millis(200),
                    Duration::from_secs(30),
                );
                tracing::debug!(error = %e, ?wait, "watch stream unavailable; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        tracing::debug!(since, "watch stream open");
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = svids.changed() => break,
                m = stream.message() => m,
            };
            let ev = match msg {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    tracing::debug!("watch stream ended by the broker");
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "watch stream broke");
                    break;
                }
            };
            tracing::trace!(sequence = ev.sequence, "watch event");
            failures = 0;
            // Resume after the last revocation or directive seen. A bundle event does not
            // move the mark: a snapshot is a bundle and a revocation list under one sequence,
            // and a stream cut between the two must not resume past the list. (A bundle seen
            // twice is harmless.)
            if !matches!(ev.kind, Some(pb::watch_event::Kind::Bundle(_))) {
                since = ev.sequence;
            }
            match ev.kind {
                Some(pb::watch_event::Kind::Bundle(b)) => {
                    let before = client.bundle().map(|b| b.bundle.sequence);
                    if let Ok(nb) = client.accept_bundle(b)
                        && before != Some(nb.bundle.sequence)
                    {
                        let _ = hooks.events.send(SourceEvent::BundleChanged {
                            sequence: nb.bundle.sequence,
                        });
                    }
                }
                Some(pb::watch_event::Kind::Revocations(r)) => {
                    client.trust().apply_revocations(&r);
                    let own = client.x509_svid().and_then(|s| own_revoked(&s, &r));
                    let key_revoked = !r.revoked_keys.is_empty();
                    if let Some(reason) =
                        own.or_else(|| key_revoked.then(|| "a signing key was revoked".to_owned()))
                    {
                        let _ = hooks.events.send(SourceEvent::Revoked { reason });
                        hooks.renew_now.notify_one();
                    }
                }
                Some(pb::watch_event::Kind::RenewNow(r)) => {
                    let _ = hooks.events.send(SourceEvent::Revoked { reason: r.reason });
                    hooks.renew_now.notify_one();
                }
                None => {}
            }
        }
        // The stream ended (broker restart, new SVID): reconnect, resuming from `since`.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff(failures.max(1), Duration::from_millis(100), Duration::from_secs(30))) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        let i = Duration::from_millis(500);
        let m = Duration::from_secs(30);
        let b1 = backoff(1, i, m);
        assert!(
            b1 >= Duration::from_millis(400) && b1 <= Duration::from_millis(600),
            "{b1:?}"
        );
        let b4 = backoff(4, i, m);
        assert!(
            b4 >= Duration::from_millis(3200) && b4 <= Duration::from_millis(4800),
            "{b4:?}"
        );
        for n in [10, 30, 1000] {
            assert!(backoff(n, i, m) <= Duration::from_secs(36));
        }
    }
}
