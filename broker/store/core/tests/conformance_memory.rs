//! The conformance suite against a deliberately trivial in-memory backend, written here and
//! not in the crate: it shows the suite runs unchanged against any backend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sigil_store_core::audit::{Anchor, AuditEntry, ChainHead, Checkpoint};
use sigil_store_core::backend::{Backend, Loaded, Needs, Txn, Write};
use sigil_store_core::conformance::{Harness, run};
use sigil_store_core::model::{
    ApprovalRecord, IdentityRecord, JoinTokenRecord, KeyRecord, LedgerRecord, OwnerRecord,
    RevocationRecord, UsageRecord, credential_key,
};
use sigil_store_core::seal::Sealer;
use sigil_store_core::{GroupCommit, SCHEMA_VERSION, Store, StoreError, StoreMeta, StoreReads};

/// Everything, in maps.
#[derive(Debug, Clone, Default)]
struct Data {
    meta: Option<StoreMeta>,
    key_check: Vec<u8>,
    identities: BTreeMap<String, IdentityRecord>,
    spiffe: BTreeMap<String, String>,
    tokens: BTreeMap<String, JoinTokenRecord>,
    keys: BTreeMap<String, KeyRecord>,
    ledger: BTreeMap<Vec<u8>, LedgerRecord>,
    revocations: BTreeMap<(i64, Vec<u8>), RevocationRecord>,
    owners: BTreeMap<String, OwnerRecord>,
    approvals: BTreeMap<String, ApprovalRecord>,
    usage: BTreeMap<String, UsageRecord>,
    audit: BTreeMap<u64, Vec<u8>>,
    checkpoint: Option<Checkpoint>,
    anchor: Option<Anchor>,
}

#[derive(Debug)]
struct Memory {
    data: Arc<Mutex<Data>>,
    failing: Arc<AtomicBool>,
    /// When set, each batch waits for a permit (a stalled disk, for the overload test).
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

struct MemTxn<'a> {
    backend: &'a Memory,
    pending: Data,
}

#[async_trait(?Send)]
impl Backend for Memory {
    async fn begin(&self) -> Result<Box<dyn Txn + '_>, StoreError> {
        if let Some(g) = &self.gate {
            g.acquire().await.unwrap().forget();
        }
        let pending = self.data.lock().unwrap().clone();
        Ok(Box::new(MemTxn {
            backend: self,
            pending,
        }))
    }
    fn shut_down(&self) {}
}

#[async_trait(?Send)]
impl Txn for MemTxn<'_> {
    async fn load(&mut self, needs: &Needs) -> Result<Loaded, StoreError> {
        let d = &self.pending;
        let pick = |ids: &std::collections::BTreeSet<String>, m: &BTreeMap<String, _>| {
            ids.iter()
                .filter_map(|i| m.get(i).map(|v: &IdentityRecord| (i.clone(), v.clone())))
                .collect::<HashMap<_, _>>()
        };
        let head = match d.audit.iter().next_back() {
            Some((seq, bytes)) => ChainHead {
                seq: *seq,
                hash: serde_json::from_slice::<AuditEntry>(bytes).unwrap().hash,
            },
            None => ChainHead::default(),
        };
        Ok(Loaded {
            identities: pick(&needs.identities, &d.identities),
            revisions: needs
                .revisions
                .iter()
                .filter_map(|i| d.identities.get(i).map(|r| (i.clone(), r.revision)))
                .collect(),
            spiffe_ids: needs
                .spiffe_ids
                .iter()
                .filter_map(|s| d.spiffe.get(s).map(|i| (s.clone(), i.clone())))
                .collect(),
            join_tokens: needs
                .join_tokens
                .iter()
                .filter_map(|h| d.tokens.get(h).map(|t| (h.clone(), t.clone())))
                .collect(),
            usage: needs
                .usage
                .iter()
                .filter_map(|i| d.usage.get(i).map(|u| (i.clone(), u.clone())))
                .collect(),
            audit_hashes: needs
                .audit
                .iter()
                .filter_map(|s| {
                    d.audit
                        .get(s)
                        .map(|b| (*s, serde_json::from_slice::<AuditEntry>(b).unwrap().hash))
                })
                .collect(),
            head,
            log_seq: 0,
        })
    }

    async fn write(&mut self, writes: &[Write<'_>]) -> Result<(), StoreError> {
        let d = &mut self.pending;
        for w in writes {
            match w {
                Write::PutIdentity {
                    record,
                    replaces_spiffe_id,
                } => {
                    if let Some(s) = replaces_spiffe_id {
                        d.spiffe.remove(s);
                    }
                    d.spiffe
                        .insert(record.spiffe_id.to_string(), record.id.clone());
                    d.identities.insert(record.id.clone(), (*record).clone());
                }
                Write::PutJoinToken(t) => {
                    d.tokens.insert(t.hash.clone(), t.as_ref().clone());
                }
                Write::PutKey(k) => {
                    d.keys.insert(k.id.clone(), (*k).clone());
                }
                Write::AppendLedger(r) => {
                    d.ledger.insert(
                        credential_key(r.kind, &r.credential_id).unwrap(),
                        (*r).clone(),
                    );
                }
                Write::PutRevocation(r) => {
                    let k = (
                        r.expires_at,
                        credential_key(r.kind, &r.credential_id).unwrap(),
                    );
                    d.revocations.insert(k, (*r).clone());
                }
                Write::PruneRevocations { expired_before } => {
                    d.revocations.retain(|(exp, _), _| *exp >= *expired_before);
                }
                Write::PruneLedger {
                    issued_before,
                    limit,
                } => {
                    let doomed: Vec<Vec<u8>> = d
                        .ledger
                        .iter()
                        .filter(|(_, r)| r.issued_at < *issued_before)
                        .take(*limit)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in doomed {
                        d.ledger.remove(&k);
                    }
                }
                Write::PutOwner(o) => {
                    d.owners.insert(o.name.clone(), (*o).clone());
                }
                Write::PutApproval(a) => {
                    d.approvals.insert(a.id.clone(), (*a).clone());
                }
                Write::PutUsage { identity_id, usage } => {
                    let mut u = usage.clone();
                    u.identity_id = identity_id.clone();
                    d.usage.insert(identity_id.clone(), u);
                }
                Write::PruneAudit(c) => {
                    d.audit.retain(|s, _| *s > c.seq);
                    d.checkpoint = Some((*c).clone());
                }
                Write::AppendAudit { seq, bytes, .. } => {
                    d.audit.insert(*seq, bytes.clone());
                }
                Write::PutAnchor(a) => {
                    d.anchor = Some(a.clone());
                }
                Write::Log(_) => {}
                _ => panic!("a write the memory backend does not know"),
            }
        }
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        if self.backend.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected failure".into()));
        }
        *self.backend.data.lock().unwrap() = self.pending;
        Ok(())
    }
}

#[async_trait]
impl StoreReads for Memory {
    async fn meta(&self) -> Result<StoreMeta, StoreError> {
        Ok(self.data.lock().unwrap().meta.clone().unwrap())
    }
    async fn identities(&self) -> Result<Vec<IdentityRecord>, StoreError> {
        Ok(self
            .data
            .lock()
            .unwrap()
            .identities
            .values()
            .cloned()
            .collect())
    }
    async fn join_token(&self, hash: &str) -> Result<Option<JoinTokenRecord>, StoreError> {
        Ok(self.data.lock().unwrap().tokens.get(hash).cloned())
    }
    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        Ok(self.data.lock().unwrap().keys.values().cloned().collect())
    }
    async fn ledger_record(&self, id: &[u8]) -> Result<Option<LedgerRecord>, StoreError> {
        Ok(self.data.lock().unwrap().ledger.get(id).cloned())
    }
    async fn ledger_len(&self) -> Result<u64, StoreError> {
        Ok(self.data.lock().unwrap().ledger.len() as u64)
    }
    async fn ledger_since(
        &self,
        since: i64,
        identity_id: Option<String>,
    ) -> Result<Vec<LedgerRecord>, StoreError> {
        let mut v: Vec<LedgerRecord> = self
            .data
            .lock()
            .unwrap()
            .ledger
            .values()
            .filter(|r| r.issued_at >= since)
            .filter(|r| identity_id.as_deref().is_none_or(|i| r.identity_id == i))
            .cloned()
            .collect();
        v.sort_by_key(|r| r.issued_at);
        Ok(v)
    }
    async fn revocations(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        Ok(self
            .data
            .lock()
            .unwrap()
            .revocations
            .values()
            .cloned()
            .collect())
    }
    async fn usage(&self) -> Result<Vec<UsageRecord>, StoreError> {
        Ok(self.data.lock().unwrap().usage.values().cloned().collect())
    }
    async fn owners(&self) -> Result<Vec<OwnerRecord>, StoreError> {
        Ok(self.data.lock().unwrap().owners.values().cloned().collect())
    }
    async fn approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError> {
        Ok(self
            .data
            .lock()
            .unwrap()
            .approvals
            .values()
            .cloned()
            .collect())
    }
    async fn ledger_count_before(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        Ok(self
            .data
            .lock()
            .unwrap()
            .ledger
            .values()
            .filter(|r| r.issued_at < before)
            .take(limit)
            .count())
    }
    async fn join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        Ok(self.data.lock().unwrap().tokens.values().cloned().collect())
    }
    async fn audit_head(&self) -> Result<u64, StoreError> {
        Ok(self
            .data
            .lock()
            .unwrap()
            .audit
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0))
    }
    async fn audit_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self.data.lock().unwrap().checkpoint.clone())
    }
    async fn audit_anchor(&self) -> Result<Option<Anchor>, StoreError> {
        Ok(self.data.lock().unwrap().anchor.clone())
    }
    async fn export(
        &self,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<sigil_store_core::dump::Summary, StoreError> {
        use sigil_store_core::dump::{DumpWriter, Record};
        // The snapshot: a copy taken under the lock.
        let d = self.data.lock().unwrap().clone();
        let mut w = DumpWriter::new(
            out,
            d.meta.clone().unwrap(),
            &d.key_check,
            d.checkpoint.clone(),
            d.anchor.clone(),
        )?;
        for r in d.identities.into_values() {
            w.record(Record::Identity(r))?;
        }
        for r in d.tokens.into_values() {
            w.record(Record::JoinToken(r))?;
        }
        for r in d.keys.into_values() {
            w.record(Record::Key(r))?;
        }
        for r in d.ledger.into_values() {
            w.record(Record::Ledger(r))?;
        }
        for r in d.revocations.into_values() {
            w.record(Record::Revocation(r))?;
        }
        for r in d.usage.into_values() {
            w.record(Record::Usage(r))?;
        }
        for r in d.owners.into_values() {
            w.record(Record::Owner(r))?;
        }
        for r in d.approvals.into_values() {
            w.record(Record::Approval(r))?;
        }
        for (seq, b) in d.audit {
            w.record(Record::Audit {
                seq,
                entry: String::from_utf8(b).unwrap(),
            })?;
        }
        w.finish()
    }
    async fn audit_entries(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .data
            .lock()
            .unwrap()
            .audit
            .range(from..)
            .take(limit)
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }
}

/// One named store's data and its failure switch.
type Named = (Arc<Mutex<Data>>, Arc<AtomicBool>);

/// Named stores that outlive their `Store`s, so a test can reopen one.
#[derive(Default)]
struct MemoryHarness {
    stores: Mutex<HashMap<String, Named>>,
}

impl MemoryHarness {
    fn start(&self, name: &str, sealer: Arc<Sealer>) -> Result<Arc<dyn Store>, StoreError> {
        let Some((data, failing)) = self.stores.lock().unwrap().get(name).cloned() else {
            return Err(StoreError::Incompatible(format!("{name} does not exist")));
        };
        {
            let d = data.lock().unwrap();
            let meta = d.meta.clone().unwrap();
            if meta.schema_version != SCHEMA_VERSION {
                return Err(StoreError::Incompatible(format!(
                    "{name} has schema version {}",
                    meta.schema_version
                )));
            }
            if !sealer.opens_key_check(&d.key_check) {
                return Err(StoreError::Incompatible(
                    "the master key does not match the data".into(),
                ));
            }
        }
        let store = GroupCommit::start(
            Memory {
                data,
                failing,
                gate: None,
            },
            sealer,
        )?;
        Ok(Arc::new(store))
    }
}

#[async_trait]
impl Harness for MemoryHarness {
    async fn create(
        &self,
        name: &str,
        sealer: Arc<Sealer>,
        meta: StoreMeta,
    ) -> Result<Arc<dyn Store>, StoreError> {
        let data = Data {
            meta: Some(meta),
            key_check: sealer.key_check(),
            ..Data::default()
        };
        self.stores.lock().unwrap().insert(
            name.to_owned(),
            (Arc::new(Mutex::new(data)), Arc::default()),
        );
        self.start(name, sealer)
    }
    async fn open(&self, name: &str, sealer: Arc<Sealer>) -> Result<Arc<dyn Store>, StoreError> {
        self.start(name, sealer)
    }
    fn fail_writes(&self, name: &str, on: bool) {
        self.stores.lock().unwrap()[name]
            .1
            .store(on, Ordering::SeqCst);
    }
    async fn restore(
        &self,
        name: &str,
        sealer: Arc<Sealer>,
        backup: &std::path::Path,
    ) -> Result<Arc<dyn Store>, StoreError> {
        let (header, _) = sigil_store_core::dump::check(backup, &sealer)?;
        let data = Arc::new(Mutex::new(Data {
            meta: Some(header.meta),
            key_check: sealer.key_check(),
            ..Data::default()
        }));
        let backend = Memory {
            data: data.clone(),
            failing: Arc::default(),
            gate: None,
        };
        sigil_store_core::dump::import_blocking(&backend, &sealer, backup)?;
        self.stores
            .lock()
            .unwrap()
            .insert(name.to_owned(), (data, Arc::default()));
        self.start(name, sealer)
    }
    async fn set_schema_version(&self, name: &str, version: u64) {
        let data = self.stores.lock().unwrap()[name].0.clone();
        if let Some(m) = data.lock().unwrap().meta.as_mut() {
            m.schema_version = version;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trivial_in_memory_backend_passes_the_conformance_suite() {
    run(&MemoryHarness::default()).await;
}

/// A writer that cannot keep up (its storage stalls) sheds new changes at once with
/// `Overloaded` once its queue is full, instead of letting memory grow; what it had accepted
/// still commits when the storage moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_writer_sheds_changes_at_once_and_memory_stays_bounded() {
    use sigil_store_core::audit::{AuditDraft, Decision};
    use sigil_store_core::{Change, WRITER_QUEUE};
    let sealer = Arc::new(Sealer::new(&sigil_store_core::seal::MasterKey::generate()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let data = Arc::new(Mutex::new(Data {
        meta: Some(StoreMeta {
            schema_version: SCHEMA_VERSION,
            trust_domain: "example.org".parse().unwrap(),
            created_at: 1,
        }),
        key_check: sealer.key_check(),
        ..Data::default()
    }));
    let store: Arc<dyn Store> = Arc::new(
        GroupCommit::start(
            Memory {
                data: data.clone(),
                failing: Arc::default(),
                gate: Some(gate.clone()),
            },
            sealer,
        )
        .unwrap(),
    );
    let change = || {
        Change::audit_only(vec![AuditDraft::new(
            0,
            "op",
            "deny",
            "t",
            Decision::Deny,
            "x",
            "r",
        )])
    };
    // The writer takes one batch (up to 2048) and stalls on the storage; the queue behind it
    // fills up.
    let mut waiting = Vec::new();
    for _ in 0..(WRITER_QUEUE + 2048) {
        let s = store.clone();
        waiting.push(tokio::spawn(async move { s.commit(change()).await }));
    }
    // Once the queue is full, a change is refused at once.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let started = std::time::Instant::now();
    let probe = tokio::time::timeout(std::time::Duration::from_secs(1), store.commit(change()))
        .await
        .expect("refused at once, not queued");
    let shed = match probe {
        Err(StoreError::Overloaded(m)) => m,
        other => panic!("an overloaded writer sheds: {other:?}"),
    };
    assert!(started.elapsed() < std::time::Duration::from_millis(100));
    assert!(shed.contains(&WRITER_QUEUE.to_string()), "{shed}");
    // Storage moves again: everything that was accepted commits.
    gate.add_permits(usize::MAX >> 4);
    let mut committed = 0;
    for w in waiting {
        if w.await.unwrap().is_ok() {
            committed += 1;
        }
    }
    assert!(
        committed >= WRITER_QUEUE,
        "the queued changes commit: {committed}"
    );
    let stored = data.lock().unwrap().audit.len();
    assert_eq!(stored, store.audit_head().await.unwrap() as usize);
    assert_eq!(stored, committed, "one audit entry per committed change");
}
