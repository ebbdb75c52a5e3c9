//! The revocation hub: the in-memory revocation set every check reads, and the fan-out of
//! trust changes to `Watch` streams (SDKs and verifiers).
//!
//! Both follow the store: the broker's commit observer feeds them in commit order, so a
//! revocation is enforced by the broker and pushed to watchers as soon as it is durable.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::broadcast;

#[cfg(test)]
use crate::model::CredentialKind;
use crate::model::{RevocationRecord, credential_key};

/// Revoked credentials that have not expired yet, by credential id.
#[derive(Debug, Default)]
pub struct RevocationSet {
    inner: RwLock<HashMap<Vec<u8>, RevocationRecord>>,
    version: AtomicU64,
}

impl RevocationSet {
    /// A set holding `records`.
    pub fn new(records: Vec<RevocationRecord>) -> Self {
        let set = RevocationSet::default();
        for r in records {
            set.insert(r);
        }
        set
    }

    /// Adds a revocation.
    pub fn insert(&self, r: RevocationRecord) {
        if let Some(k) = credential_key(r.kind, &r.credential_id) {
            self.inner
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(k, r);
            self.version.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Drops revocations of credentials that expired before `before`; returns their ids.
    pub fn prune(&self, before: i64) -> Vec<String> {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let mut gone = Vec::new();
        inner.retain(|_, r| {
            let keep = r.expires_at >= before;
            if !keep {
                gone.push(r.credential_id.clone());
            }
            keep
        });
        if !gone.is_empty() {
            self.version.fetch_add(1, Ordering::SeqCst);
        }
        gone
    }

    /// The revocation of the credential with these id bytes, if it is revoked.
    pub fn get(&self, id: &[u8]) -> Option<RevocationRecord> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Whether the credential with these id bytes is revoked.
    /// Whether this record's credential is revoked already.
    pub fn contains_record(&self, r: &RevocationRecord) -> bool {
        crate::model::credential_key(r.kind, &r.credential_id).is_some_and(|k| self.contains(&k))
    }

    /// Whether the credential with this key (serial or `jti` bytes) is revoked.
    pub fn contains(&self, id: &[u8]) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    /// Every revocation.
    pub fn snapshot(&self) -> Vec<RevocationRecord> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Number of revocations held.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changes on every insert or prune (for caching CRLs).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }
}

/// Who a directive is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every watcher.
    All,
    /// The holder of the certificate with this serial (hex).
    Serial(String),
    /// Every holder of a credential of this identity.
    SpiffeId(String),
}

/// A trust change.
#[derive(Debug, Clone)]
pub enum HubEvent {
    /// The bundle changed (fetch the current one).
    Bundle,
    /// Credentials were revoked.
    Revoked(Vec<RevocationRecord>),
    /// Revocations expired and were dropped.
    Expired(Vec<String>),
    /// Identity generations moved: (SPIFFE ID, new generation).
    Floors(Vec<(String, u64)>),
    /// Signing keys were revoked (JWT kids, CA key identifiers).
    KeysRevoked(Vec<String>),
    /// Renew now.
    RenewNow {
        /// Who.
        target: Target,
        /// Why.
        reason: String,
    },
}

/// A sequenced event.
#[derive(Debug, Clone)]
pub struct Sequenced {
    /// Sequence number.
    pub seq: u64,
    /// The event.
    pub event: HubEvent,
}

/// How many recent events are kept for resuming watchers.
const REPLAY_WINDOW: usize = 4096;

/// Bits of a sequence number below the hub's instance tag.
const TAG_SHIFT: u32 = 48;

/// Fans trust changes out to watchers.
///
/// Sequence numbers carry the hub's instance in their top 16 bits: a watcher that resumes
/// with a number from another process (a restarted broker, or another replica on the same
/// database after a failover) gets a full snapshot, never a replay of this hub's events as if
/// they were the ones it missed.
#[derive(Debug)]
pub struct Hub {
    tx: broadcast::Sender<Arc<Sequenced>>,
    tag: u64,
    seq: AtomicU64,
    recent: Mutex<VecDeque<Arc<Sequenced>>>,
    /// Open watch streams per client.
    clients: Arc<Mutex<HashMap<String, usize>>>,
}

/// One admitted watch stream; the client's count drops when it is dropped.
#[derive(Debug)]
pub struct WatchSlot {
    clients: Arc<Mutex<HashMap<String, usize>>>,
    client: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut m = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.client);
            }
        }
    }
}

impl Hub {
    /// A hub whose sequence starts at `start` (a value larger than any earlier process used,
    /// e.g. the start time in microseconds, so resuming across restarts falls back to a
    /// snapshot rather than skipping events).
    pub fn new(start: u64) -> Self {
        let (tx, _) = broadcast::channel(REPLAY_WINDOW);
        let tag = u64::from(u16::from_be_bytes(sigil_pki::ids::random_bytes::<2>()) | 1);
        Hub {
            tx,
            tag,
            seq: AtomicU64::new((tag << TAG_SHIFT) | (start & ((1 << TAG_SHIFT) - 1))),
            recent: Mutex::new(VecDeque::with_capacity(REPLAY_WINDOW)),
            clients: Arc::default(),
        }
    }

    /// Admits one more watch stream for `client`, unless it already has `max` open.
    pub fn admit(&self, client: &str, max: usize) -> Option<WatchSlot> {
        let mut m = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(client.to_owned()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(WatchSlot {
            clients: self.clients.clone(),
            client: client.to_owned(),
        })
    }

    /// Publishes an event.
    pub fn publish(&self, event: HubEvent) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        // Sequence and buffer order agree because both happen under the lock.
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let ev = Arc::new(Sequenced { seq, event });
        if recent.len() == REPLAY_WINDOW {
            recent.pop_front();
        }
        recent.push_back(ev.clone());
        let _ = self.tx.send(ev);
        metrics::counter!("sigil_hub_events_total").increment(1);
    }

    /// The current sequence number.
    pub fn sequence(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Subscribes, and returns the events after `since` if the hub still has all of them
    /// (`None`: the caller needs a snapshot).
    pub fn subscribe(
        &self,
        since: u64,
    ) -> (
        broadcast::Receiver<Arc<Sequenced>>,
        Option<Vec<Arc<Sequenced>>>,
    ) {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        let current = self.seq.load(Ordering::SeqCst);
        let replay = if since == 0 || since > current || since >> TAG_SHIFT != self.tag {
            None
        } else if since == current {
            Some(Vec::new())
        } else {
            match recent.front() {
                Some(first) if first.seq <= since + 1 => {
                    Some(recent.iter().filter(|e| e.seq > since).cloned().collect())
                }
                _ => None,
            }
        };
        (rx, replay)
    }

    /// Number of live subscribers.
    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(id: &str, exp: i64) -> RevocationRecord {
        RevocationRecord {
            credential_id: id.into(),
            kind: CredentialKind::X509,
            identity_id: "id-1".into(),
            spiffe_id: "spiffe://td/a".into(),
            signing_key_id: "k".into(),
            expires_at: exp,
            revoked_at: 0,
            reason: "r".into(),
            revoked_by: "t".into(),
        }
    }

    #[test]
    fn revocations_are_pruned_once_they_expire() {
        let s = RevocationSet::new(vec![rev("aa01", 100), rev("aa02", 200)]);
        assert!(s.contains(&[0xaa, 0x01]));
        let v = s.version();
        assert_eq!(s.prune(150), vec!["aa01".to_owned()]);
        assert!(!s.contains(&[0xaa, 0x01]) && s.contains(&[0xaa, 0x02]));
        assert!(s.version() > v);
        assert!(s.prune(150).is_empty());
    }

    #[test]
    fn subscribers_resume_from_the_replay_window_or_get_a_snapshot() {
        let hub = Hub::new(1000);
        let base = hub.sequence();
        assert_eq!(base & ((1 << TAG_SHIFT) - 1), 1000);
        hub.publish(HubEvent::Bundle);
        hub.publish(HubEvent::Bundle);
        let (_rx, replay) = hub.subscribe(base + 1);
        assert_eq!(
            replay.unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![base + 2]
        );
        let (_rx, replay) = hub.subscribe(base + 2);
        assert!(replay.unwrap().is_empty());
        assert!(hub.subscribe(0).1.is_none(), "fresh start: snapshot");
        assert!(hub.subscribe(base - 5).1.is_none(), "too old: snapshot");
        assert!(
            hub.subscribe(base + 99_999).1.is_none(),
            "from the future: snapshot"
        );
        // A number another hub (a replica, a restarted broker) gave out, even one that falls
        // inside this hub's range when the tags are ignored, gets a snapshot.
        let other = Hub::new(900);
        let foreign = (other.sequence() & ((1 << TAG_SHIFT) - 1)) | ((hub.tag ^ 2) << TAG_SHIFT);
        assert!(
            hub.subscribe(foreign + 101).1.is_none(),
            "from another process: snapshot"
        );
        let (mut rx, _) = hub.subscribe(base + 2);
        hub.publish(HubEvent::Expired(vec!["x".into()]));
        assert_eq!(rx.try_recv().unwrap().seq, base + 3);
    }

    #[test]
    fn each_client_gets_at_most_its_share_of_watch_streams() {
        let hub = Hub::new(0);
        let a1 = hub.admit("a", 2).unwrap();
        let _a2 = hub.admit("a", 2).unwrap();
        assert!(hub.admit("a", 2).is_none(), "a third for the same client");
        let _b = hub.admit("b", 2).expect("another client is not affected");
        drop(a1);
        assert!(
            hub.admit("a", 2).is_some(),
            "a closed stream frees its slot"
        );
    }
}
