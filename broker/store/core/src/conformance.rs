//! The conformance suite: one set of checks every backend passes, as SPIRE runs one datastore
//! suite over every SQL dialect. A backend's tests implement [`Harness`] and call [`run`].
//!
//! What it checks: every [`Op`] and every read; every precondition and conflict, and that a
//! conflicting change writes nothing (not even its audit entries); the commit sequences the
//! writer stamps; the audit chain, its verification and its head; a store of another schema
//! version and a wrong master key refused; reopening (an acknowledged change is there; a change
//! whose commit failed left nothing); and concurrency (many writers, one order, one winner per
//! join token).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sigil_pki::ids;

use crate::audit::{
    AuditDraft, AuditEntry, ChainReport, Checkpoint, Decision, StoredChain, verify_chain,
    verify_chain_from, verify_stored,
};
use crate::model::{
    ApprovalRecord, CredentialKind, Entitlements, IdentityRecord, IdentityStatus, JoinTokenRecord,
    KeyKind, KeyRecord, KeyState, LedgerRecord, OwnerRecord, RevocationRecord,
};
use crate::seal::{MasterKey, Sealer};
use crate::{Change, CommitObserver, Conflict, Op, SCHEMA_VERSION, Store, StoreError, StoreMeta};

/// What the suite needs from a backend's tests. Stores are named so a test can close one and
/// open it again; each name is used by one test only.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Creates a new, empty store called `name`.
    async fn create(
        &self,
        name: &str,
        sealer: Arc<Sealer>,
        meta: StoreMeta,
    ) -> Result<Arc<dyn Store>, StoreError>;

    /// Opens the store called `name` again (it was closed, or its process was lost).
    async fn open(&self, name: &str, sealer: Arc<Sealer>) -> Result<Arc<dyn Store>, StoreError>;

    /// Makes every later write of the store called `name` fail at the storage layer (a full
    /// disk, a lost database), or stop failing.
    fn fail_writes(&self, name: &str, on: bool);

    /// Rewrites the stored schema version of the closed store called `name`.
    async fn set_schema_version(&self, name: &str, version: u64);

    /// Makes a new store called `name` from the backup file `backup` (see [`crate::dump`]);
    /// a refused backup leaves no store behind.
    async fn restore(
        &self,
        name: &str,
        sealer: Arc<Sealer>,
        backup: &std::path::Path,
    ) -> Result<Arc<dyn Store>, StoreError>;
}

/// Runs every check against `h`, panicking with the check's name on the first failure.
pub async fn run(h: &dyn Harness) {
    every_op_round_trips(h).await;
    preconditions_refuse_and_write_nothing(h).await;
    commit_order_is_stamped(h).await;
    the_audit_chain_is_one_chain(h).await;
    the_observer_hears_first_in_commit_order(h).await;
    reopening_keeps_acknowledged_changes_and_nothing_of_failed_ones(h).await;
    a_failed_write_recovers_by_itself(h).await;
    another_schema_or_key_is_refused(h).await;
    many_writers_one_order(h).await;
    retention_leaves_a_checkpoint_the_chain_verifies_from(h).await;
    a_backup_restores_the_same_state_and_refuses_a_bad_one(h).await;
}

const NOW: i64 = 1_900_000_000;

fn sealer() -> Arc<Sealer> {
    Arc::new(Sealer::new(&MasterKey::generate()))
}

fn meta() -> StoreMeta {
    StoreMeta {
        schema_version: SCHEMA_VERSION,
        trust_domain: "example.org".parse().unwrap_or_else(|_| unreachable!()),
        created_at: NOW,
    }
}

fn at(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs as u64)
}

/// An identity record.
pub fn identity(id: &str, path: &str) -> IdentityRecord {
    IdentityRecord {
        id: id.into(),
        spiffe_id: format!("spiffe://example.org/{path}")
            .parse()
            .unwrap_or_else(|_| unreachable!("a valid SPIFFE ID")),
        owner: "team".into(),
        purpose: "conformance".into(),
        labels: Default::default(),
        selectors: Default::default(),
        entitlements: Entitlements {
            kinds: [CredentialKind::X509, CredentialKind::Jwt].into(),
            max_ttl_secs: 3600,
            audiences: ["db".to_owned()].into(),
            ..Default::default()
        },
        status: IdentityStatus::Active,
        status_reason: String::new(),
        status_since: NOW,
        status_seq: 0,
        expires_at: NOW + 86400,
        generation: 1,
        created_at: NOW,
        created_by: "op".into(),
        updated_at: NOW,
        updated_by: "op".into(),
        revision: 1,
        recertified_at: 0,
        recertified_by: String::new(),
    }
}

fn join_token(hash: &str, identity_id: &str, expires_at: i64) -> JoinTokenRecord {
    JoinTokenRecord {
        hash: hash.into(),
        identity_id: identity_id.into(),
        created_at: NOW,
        created_seq: 0,
        created_by: "op".into(),
        expires_at,
        consumed_at: None,
    }
}

fn ledger(kind: CredentialKind, identity_id: &str, issued_at: i64) -> LedgerRecord {
    let t = at(issued_at);
    let credential_id = match kind {
        CredentialKind::X509 => ids::to_hex(&ids::new_serial(t)),
        CredentialKind::Jwt => ids::jti_to_string(&ids::new_jti(t)),
    };
    LedgerRecord {
        credential_id,
        kind,
        identity_id: identity_id.into(),
        spiffe_id: "spiffe://example.org/a".into(),
        generation: 1,
        audiences: if kind == CredentialKind::Jwt {
            vec!["db".into()]
        } else {
            Vec::new()
        },
        scopes: Vec::new(),
        dns_names: Vec::new(),
        issued_at,
        expires_at: issued_at + 600,
        signing_key_id: "k1".into(),
        attestation: "join_token".into(),
        source: "127.0.0.1".into(),
    }
}

fn revocation(r: &LedgerRecord) -> RevocationRecord {
    RevocationRecord {
        credential_id: r.credential_id.clone(),
        kind: r.kind,
        identity_id: r.identity_id.clone(),
        spiffe_id: r.spiffe_id.clone(),
        signing_key_id: r.signing_key_id.clone(),
        expires_at: r.expires_at,
        revoked_at: r.issued_at + 1,
        reason: "leaked".into(),
        revoked_by: "op".into(),
    }
}

fn key(id: &str, state: KeyState) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        kind: KeyKind::Jwt,
        state,
        cert_der: None,
        sealed_private: vec![1, 2, 3],
        created_at: NOW,
        not_after: NOW + 86400,
        activated_at: Some(NOW),
        retire_at: None,
        changed_at: NOW,
        ski: None,
        revoked_reason: String::new(),
    }
}

fn draft(action: &str, target: &str) -> AuditDraft {
    AuditDraft::new(
        NOW * 1_000_000_000,
        "op",
        action,
        target,
        Decision::Allow,
        "ok",
        "req",
    )
}

fn change(ops: Vec<Op>, action: &str) -> Change {
    Change {
        ops,
        audit: vec![draft(action, "t")],
    }
}

async fn fresh(h: &dyn Harness, name: &str) -> (Arc<dyn Store>, Arc<Sealer>) {
    let s = sealer();
    let store = h
        .create(name, s.clone(), meta())
        .await
        .unwrap_or_else(|e| panic!("{name}: create: {e}"));
    (store, s)
}

async fn chain_is_intact(store: &dyn Store, sealer: &Sealer, entries: u64, check: &str) {
    let all = store
        .audit_entries(1, usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{check}: audit entries: {e}"));
    let stored = StoredChain {
        checkpoint: store.audit_checkpoint().await.unwrap_or(None),
        anchor: store.audit_anchor().await.unwrap_or(None),
        entries: all,
    };
    if entries > 0 {
        let anchor = stored.anchor.as_ref();
        assert_eq!(
            anchor.map(|a| a.seq),
            Some(entries),
            "{check}: the anchor is at the chain's end"
        );
    }
    assert_eq!(
        verify_stored(sealer, &stored),
        ChainReport::Intact { entries },
        "{check}: the audit chain, its checkpoint and its anchor"
    );
    // Removing the last entry is found through the anchor.
    if stored.entries.len() > 1 {
        let mut cut = stored.clone();
        cut.entries.pop();
        assert!(
            matches!(verify_stored(sealer, &cut), ChainReport::Broken { seq, .. } if seq == entries),
            "{check}: a removed last entry is found"
        );
    }
    assert_eq!(
        store.audit_head().await.ok(),
        Some(entries),
        "{check}: audit head"
    );
}

async fn every_op_round_trips(h: &dyn Harness) {
    const C: &str = "every_op_round_trips";
    let (store, sealer) = fresh(h, C).await;
    assert_eq!(store.meta().await.ok(), Some(meta()), "{C}: meta");
    let mut a = identity("id-a", "a");
    let b = identity("id-b", "b");
    store
        .commit(change(
            vec![Op::CreateIdentity(a.clone()), Op::CreateIdentity(b.clone())],
            "identity.create",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: create identities: {e}"));
    // Update, renaming the SPIFFE ID: the old name is free again.
    a.spiffe_id = "spiffe://example.org/a2"
        .parse()
        .unwrap_or_else(|_| unreachable!());
    a.revision = 2;
    a.owner = "other-team".into();
    store
        .commit(change(
            vec![Op::UpdateIdentity {
                record: a.clone(),
                expected_revision: 1,
            }],
            "identity.update",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: update: {e}"));
    let mut c = identity("id-c", "a");
    store
        .commit(change(
            vec![Op::CreateIdentity(c.clone())],
            "identity.create",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: the old SPIFFE ID is free after a rename: {e}"));
    let got: BTreeSet<(String, String, String, u64)> = store
        .identities()
        .await
        .unwrap_or_else(|e| panic!("{C}: identities: {e}"))
        .into_iter()
        .map(|r| (r.id, r.spiffe_id.to_string(), r.owner, r.revision))
        .collect();
    c.revision = 1;
    assert_eq!(
        got,
        [
            (
                "id-a".into(),
                "spiffe://example.org/a2".into(),
                "other-team".into(),
                2
            ),
            (
                "id-b".into(),
                "spiffe://example.org/b".into(),
                "team".into(),
                1
            ),
            (
                "id-c".into(),
                "spiffe://example.org/a".into(),
                "team".into(),
                c.revision
            ),
        ]
        .into(),
        "{C}: identities after create, update, rename"
    );

    // Join tokens: stored by hash, consumed once.
    store
        .commit(change(
            vec![Op::PutJoinToken(join_token("h1", "id-b", NOW + 600))],
            "join_token.create",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: put join token: {e}"));
    store
        .commit(change(
            vec![
                Op::AssertIdentityRevision {
                    id: "id-b".into(),
                    revision: 1,
                },
                Op::ConsumeJoinToken {
                    hash: "h1".into(),
                    now: NOW + 5,
                },
            ],
            "attest",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: consume: {e}"));
    let t = store.join_token("h1").await.ok().flatten();
    assert_eq!(
        t.as_ref().and_then(|t| t.consumed_at),
        Some(NOW + 5),
        "{C}: consumed"
    );
    assert_eq!(
        store.join_tokens().await.map(|v| v.len()).ok(),
        Some(1),
        "{C}: join tokens"
    );
    assert!(
        store.join_token("nope").await.ok().flatten().is_none(),
        "{C}: an unknown token"
    );

    // Keys, owners, approvals: put replaces.
    for state in [KeyState::Next, KeyState::Current] {
        store
            .commit(change(vec![Op::PutKey(key("k1", state))], "key.put"))
            .await
            .unwrap_or_else(|e| panic!("{C}: put key: {e}"));
    }
    let keys = store.keys().await.unwrap_or_default();
    assert_eq!(
        keys.iter()
            .map(|k| (k.id.as_str(), k.state))
            .collect::<Vec<_>>(),
        [("k1", KeyState::Current)],
        "{C}: keys"
    );
    assert_eq!(keys[0].sealed_private, vec![1, 2, 3], "{C}: sealed bytes");
    let owner = OwnerRecord {
        name: "alice".into(),
        deactivated_at: Some(NOW),
        changed_by: "op".into(),
        reason: "left".into(),
    };
    let approval = ApprovalRecord {
        id: "apr-1".into(),
        identity_id: "id-b".into(),
        scopes: ["admin".to_owned()].into(),
        created_at: NOW,
        expires_at: NOW + 60,
        approved_by: "op".into(),
        reason: "INC-1".into(),
        revoked_at: None,
        expiry_audited: false,
    };
    store
        .commit(change(
            vec![
                Op::PutOwner(owner.clone()),
                Op::PutApproval(approval.clone()),
            ],
            "owner.put",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: owner and approval: {e}"));
    assert_eq!(store.owners().await.ok(), Some(vec![owner]), "{C}: owners");
    assert_eq!(
        store.approvals().await.ok(),
        Some(vec![approval]),
        "{C}: approvals"
    );

    // Ledger, usage, revocations, pruning.
    let old = ledger(CredentialKind::X509, "id-b", NOW - 7200);
    let x = ledger(CredentialKind::X509, "id-b", NOW);
    let j = ledger(CredentialKind::Jwt, "id-a", NOW + 1);
    store
        .commit(change(
            vec![
                Op::AppendLedger(old.clone()),
                Op::AppendLedger(x.clone()),
                Op::AppendLedger(j.clone()),
            ],
            "x509.mint",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: ledger: {e}"));
    assert_eq!(store.ledger_len().await.ok(), Some(3), "{C}: ledger length");
    for r in [&old, &x, &j] {
        let key = crate::model::credential_key(r.kind, &r.credential_id)
            .unwrap_or_else(|| unreachable!());
        assert_eq!(
            store.ledger_record(&key).await.ok().flatten().as_ref(),
            Some(r),
            "{C}: ledger record by id"
        );
    }
    assert_eq!(
        store
            .ledger_since(NOW - 10, None)
            .await
            .unwrap_or_default()
            .iter()
            .map(|r| r.credential_id.clone())
            .collect::<Vec<_>>(),
        vec![x.credential_id.clone(), j.credential_id.clone()],
        "{C}: ledger since, oldest first"
    );
    assert_eq!(
        store
            .ledger_since(0, Some("id-a".into()))
            .await
            .unwrap_or_default(),
        vec![j.clone()],
        "{C}: ledger of one identity"
    );
    assert_eq!(
        store.ledger_count_before(NOW - 10, 100).await.ok(),
        Some(1),
        "{C}: ledger count before"
    );
    let usage = store.usage().await.unwrap_or_default();
    let b_usage = usage.iter().find(|u| u.identity_id == "id-b");
    assert_eq!(
        b_usage.map(|u| u.issued),
        Some(2),
        "{C}: usage follows the ledger: {usage:?}"
    );
    store
        .commit(change(
            vec![
                Op::PutRevocation(revocation(&old)),
                Op::PutRevocation(revocation(&x)),
            ],
            "revoke",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: revocations: {e}"));
    assert_eq!(
        store.revocations().await.map(|v| v.len()).ok(),
        Some(2),
        "{C}: revocations"
    );
    store
        .commit(change(
            vec![
                Op::PruneRevocations {
                    expired_before: NOW - 100,
                },
                Op::PruneLedger {
                    issued_before: NOW - 100,
                    limit: 10,
                },
            ],
            "prune",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: prune: {e}"));
    assert_eq!(
        store
            .revocations()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.credential_id)
            .collect::<Vec<_>>(),
        vec![x.credential_id.clone()],
        "{C}: only expired revocations are pruned"
    );
    assert_eq!(store.ledger_len().await.ok(), Some(2), "{C}: ledger pruned");
    chain_is_intact(&*store, &sealer, 11, C).await;
    store.close().await;
}

async fn preconditions_refuse_and_write_nothing(h: &dyn Harness) {
    const C: &str = "preconditions_refuse_and_write_nothing";
    let (store, sealer) = fresh(h, C).await;
    store
        .commit(change(
            vec![
                Op::CreateIdentity(identity("id-a", "a")),
                Op::PutJoinToken(join_token("live", "id-a", NOW + 600)),
                Op::PutJoinToken(join_token("old", "id-a", NOW - 1)),
            ],
            "setup",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: setup: {e}"));
    let ledger_row = ledger(CredentialKind::Jwt, "id-a", NOW);
    let mut renamed = identity("id-a", "b");
    renamed.revision = 2;
    let cases: Vec<(Vec<Op>, Conflict)> = vec![
        (
            vec![Op::CreateIdentity(identity("id-a", "z"))],
            Conflict::IdentityIdTaken("id-a".into()),
        ),
        (
            vec![Op::CreateIdentity(identity("id-z", "a"))],
            Conflict::SpiffeIdTaken("spiffe://example.org/a".into()),
        ),
        (
            vec![Op::UpdateIdentity {
                record: identity("id-missing", "m"),
                expected_revision: 1,
            }],
            Conflict::IdentityMissing("id-missing".into()),
        ),
        (
            vec![Op::UpdateIdentity {
                record: renamed.clone(),
                expected_revision: 7,
            }],
            Conflict::StaleRevision {
                id: "id-a".into(),
                expected: 7,
                found: 1,
            },
        ),
        (
            vec![
                Op::AppendLedger(ledger_row.clone()),
                Op::AssertIdentityRevision {
                    id: "id-a".into(),
                    revision: 3,
                },
            ],
            Conflict::StaleRevision {
                id: "id-a".into(),
                expected: 3,
                found: 1,
            },
        ),
        (
            vec![Op::AssertIdentityRevision {
                id: "id-gone".into(),
                revision: 1,
            }],
            Conflict::IdentityMissing("id-gone".into()),
        ),
        (
            vec![
                Op::AppendLedger(ledger_row.clone()),
                Op::ConsumeJoinToken {
                    hash: "unknown".into(),
                    now: NOW,
                },
            ],
            Conflict::JoinTokenUnknown,
        ),
        (
            vec![Op::ConsumeJoinToken {
                hash: "old".into(),
                now: NOW,
            }],
            Conflict::JoinTokenExpired,
        ),
    ];
    for (ops, want) in cases {
        let before_ledger = store.ledger_len().await.ok();
        let before_audit = store.audit_head().await.ok();
        let got = store.commit(change(ops, "refused")).await;
        match got {
            Err(StoreError::Conflict(c)) => assert_eq!(c, want, "{C}"),
            other => panic!("{C}: expected {want:?}, got {other:?}"),
        }
        assert_eq!(
            store.ledger_len().await.ok(),
            before_ledger,
            "{C}: {want:?} wrote a ledger row"
        );
        assert_eq!(
            store.audit_head().await.ok(),
            before_audit,
            "{C}: {want:?} wrote an audit entry"
        );
    }
    // Renaming onto a SPIFFE ID another identity holds.
    store
        .commit(change(
            vec![Op::CreateIdentity(identity("id-b", "b"))],
            "setup",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: second identity: {e}"));
    let e = store
        .commit(change(
            vec![Op::UpdateIdentity {
                record: renamed,
                expected_revision: 1,
            }],
            "rename",
        ))
        .await;
    assert!(
        matches!(e, Err(StoreError::Conflict(Conflict::SpiffeIdTaken(_)))),
        "{C}: rename onto a taken SPIFFE ID: {e:?}"
    );
    // Used once, then refused; a used token stays used.
    let consume = || {
        change(
            vec![Op::ConsumeJoinToken {
                hash: "live".into(),
                now: NOW,
            }],
            "attest",
        )
    };
    assert!(store.commit(consume()).await.is_ok(), "{C}: first use");
    assert!(
        matches!(
            store.commit(consume()).await,
            Err(StoreError::Conflict(Conflict::JoinTokenUsed))
        ),
        "{C}: second use"
    );
    // Preconditions are judged against the state before the change: a change that creates an
    // identity cannot also assert its revision.
    let e = store
        .commit(change(
            vec![
                Op::CreateIdentity(identity("id-new", "new")),
                Op::AssertIdentityRevision {
                    id: "id-new".into(),
                    revision: 1,
                },
            ],
            "both",
        ))
        .await;
    assert!(
        matches!(e, Err(StoreError::Conflict(Conflict::IdentityMissing(_)))),
        "{C}: {e:?}"
    );
    assert!(
        !store
            .identities()
            .await
            .unwrap_or_default()
            .iter()
            .any(|r| r.id == "id-new"),
        "{C}: a refused change created nothing"
    );
    chain_is_intact(&*store, &sealer, 3, C).await;
    store.close().await;
}

async fn commit_order_is_stamped(h: &dyn Harness) {
    const C: &str = "commit_order_is_stamped";
    let (store, _) = fresh(h, C).await;
    let mut a = identity("id-a", "a");
    let first = store
        .commit(change(vec![Op::CreateIdentity(a.clone())], "create"))
        .await
        .unwrap_or_else(|e| panic!("{C}: {e}"));
    let token = store
        .commit(change(
            vec![Op::PutJoinToken(join_token("t1", "id-a", NOW + 600))],
            "token",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: {e}"));
    a.revision = 2;
    a.owner = "new owner".into();
    store
        .commit(change(
            vec![Op::UpdateIdentity {
                record: a.clone(),
                expected_revision: 1,
            }],
            "update",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: {e}"));
    let get = |s: Arc<dyn Store>| async move {
        s.identities()
            .await
            .unwrap_or_default()
            .into_iter()
            .find(|r| r.id == "id-a")
            .map(|r| r.status_seq)
    };
    assert_eq!(
        get(store.clone()).await,
        Some(first.audit_seqs[0]),
        "{C}: a change that keeps the status keeps its sequence"
    );
    a.revision = 3;
    a.status = IdentityStatus::Compromised;
    let compromised = store
        .commit(change(
            vec![Op::UpdateIdentity {
                record: a,
                expected_revision: 2,
            }],
            "compromise",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: {e}"));
    assert_eq!(
        get(store.clone()).await,
        Some(compromised.audit_seqs[0]),
        "{C}: a status change takes its commit's sequence"
    );
    assert_eq!(
        store
            .join_token("t1")
            .await
            .ok()
            .flatten()
            .map(|t| t.created_seq),
        Some(token.audit_seqs[0]),
        "{C}: a join token carries the sequence of the commit that created it"
    );
    assert!(
        token.audit_seqs[0] < compromised.audit_seqs[0],
        "{C}: order"
    );
    store.close().await;
}

async fn the_audit_chain_is_one_chain(h: &dyn Harness) {
    const C: &str = "the_audit_chain_is_one_chain";
    let (store, sealer) = fresh(h, C).await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        let c = store
            .commit(Change {
                ops: Vec::new(),
                audit: vec![draft("deny", &format!("t{i}")), draft("deny", "again")],
            })
            .await
            .unwrap_or_else(|e| panic!("{C}: {e}"));
        seqs.extend(c.audit_seqs);
    }
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<u64>>(),
        "{C}: gap-free, in order"
    );
    let page = store.audit_entries(4, 3).await.unwrap_or_default();
    assert_eq!(
        page.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![4, 5, 6],
        "{C}: a page of entries"
    );
    chain_is_intact(&*store, &sealer, 10, C).await;
    let other = Sealer::new(&MasterKey::generate());
    assert!(
        matches!(
            verify_chain(
                &other,
                store.audit_entries(1, 100).await.unwrap_or_default()
            ),
            ChainReport::Broken { seq: 1, .. }
        ),
        "{C}: another key cannot verify the chain"
    );
    store.close().await;
}

#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<String>>,
}

impl CommitObserver for Recorder {
    fn committed(&self, ops: &[&Op]) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for op in ops {
            if let Op::CreateIdentity(r) = op {
                seen.push(format!("{}@{}", r.id, r.status_seq));
            }
        }
    }
}

async fn the_observer_hears_first_in_commit_order(h: &dyn Harness) {
    const C: &str = "the_observer_hears_first_in_commit_order";
    let (store, _) = fresh(h, C).await;
    let rec = Arc::new(Recorder::default());
    let weak: Weak<dyn CommitObserver> = Arc::downgrade(&rec) as Weak<Recorder>;
    store.set_observer(weak);
    for i in 0..3 {
        let c = store
            .commit(change(
                vec![Op::CreateIdentity(identity(
                    &format!("id-{i}"),
                    &format!("p{i}"),
                ))],
                "create",
            ))
            .await
            .unwrap_or_else(|e| panic!("{C}: {e}"));
        let seen = rec.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(
            seen.last(),
            Some(&format!("id-{i}@{}", c.audit_seqs[0])),
            "{C}: the observer had the (stamped) change before the committer heard back"
        );
    }
    // A refused change is not observed.
    let _ = store
        .commit(change(
            vec![Op::CreateIdentity(identity("id-0", "again"))],
            "dup",
        ))
        .await;
    assert_eq!(rec.seen.lock().map(|s| s.len()).ok(), Some(3), "{C}");
    store.close().await;
}

async fn reopening_keeps_acknowledged_changes_and_nothing_of_failed_ones(h: &dyn Harness) {
    const C: &str = "reopening_keeps_acknowledged_changes_and_nothing_of_failed_ones";
    let (store, sealer) = fresh(h, C).await;
    store
        .commit(change(
            vec![Op::CreateIdentity(identity("id-a", "a"))],
            "create",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: {e}"));
    h.fail_writes(C, true);
    let failed = store
        .commit(change(
            vec![
                Op::CreateIdentity(identity("id-b", "b")),
                Op::AppendLedger(ledger(CredentialKind::X509, "id-a", NOW)),
            ],
            "create",
        ))
        .await;
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "{C}: a failed write is Unavailable: {failed:?}"
    );
    assert!(store.health().is_err(), "{C}: health reports the failure");
    h.fail_writes(C, false);
    store.close().await;
    let store = h
        .open(C, sealer.clone())
        .await
        .unwrap_or_else(|e| panic!("{C}: reopen: {e}"));
    let ids: Vec<String> = store
        .identities()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(
        ids,
        vec!["id-a".to_owned()],
        "{C}: only the acknowledged change"
    );
    assert_eq!(
        store.ledger_len().await.ok(),
        Some(0),
        "{C}: all-or-nothing"
    );
    chain_is_intact(&*store, &sealer, 1, C).await;
    assert!(store.health().is_ok(), "{C}: healthy after reopening");
    let c = store
        .commit(change(
            vec![Op::CreateIdentity(identity("id-b", "b"))],
            "create",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: commit after reopen: {e}"));
    assert_eq!(c.audit_seqs, vec![2], "{C}: the chain continues");
    chain_is_intact(&*store, &sealer, 2, C).await;
    store.close().await;
}

/// After a failed write the writer recovers the backend by itself once the cause goes away:
/// no reopen, no restart; meanwhile every change is refused at once.
async fn a_failed_write_recovers_by_itself(h: &dyn Harness) {
    const C: &str = "a_failed_write_recovers_by_itself";
    let (store, sealer) = fresh(h, C).await;
    store
        .commit(change(
            vec![Op::CreateIdentity(identity("id-a", "a"))],
            "create",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: {e}"));
    h.fail_writes(C, true);
    let failed = store
        .commit(change(
            vec![Op::CreateIdentity(identity("id-b", "b"))],
            "create",
        ))
        .await;
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "{C}: {failed:?}"
    );
    // While it cannot recover, changes are refused (promptly: they do not wait for it).
    let started = std::time::Instant::now();
    let refused = store
        .commit(change(
            vec![Op::CreateIdentity(identity("id-c", "c"))],
            "create",
        ))
        .await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{C}: refused while recovering: {refused:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{C}: a change waiting for recovery is refused, not held"
    );
    assert!(store.health().is_err(), "{C}: not healthy while failing");
    h.fail_writes(C, false);
    // Recovery backs off to at most a few seconds between attempts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while store.health().is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{C}: the store recovered within 30 s: {:?}",
            store.health()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let c = store
        .commit(change(
            vec![Op::CreateIdentity(identity("id-b", "b"))],
            "create",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: commit after recovering: {e}"));
    assert_eq!(c.audit_seqs, vec![2], "{C}: the chain continues");
    let mut ids: Vec<String> = store
        .identities()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.id)
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec!["id-a", "id-b"],
        "{C}: nothing of the refused ones"
    );
    chain_is_intact(&*store, &sealer, 2, C).await;
    store.close().await;
}

async fn another_schema_or_key_is_refused(h: &dyn Harness) {
    const C: &str = "another_schema_or_key_is_refused";
    let (store, sealer) = fresh(h, C).await;
    store.close().await;
    match h
        .open(C, Arc::new(Sealer::new(&MasterKey::generate())))
        .await
    {
        Err(StoreError::Incompatible(m)) => {
            assert!(m.contains("master key does not match"), "{C}: {m}")
        }
        other => panic!("{C}: a wrong key: {other:?}"),
    }
    h.set_schema_version(C, SCHEMA_VERSION + 1).await;
    match h.open(C, sealer).await {
        Err(StoreError::Incompatible(m)) => assert!(m.contains("schema version"), "{C}: {m}"),
        other => panic!("{C}: a newer schema: {other:?}"),
    }
}

async fn many_writers_one_order(h: &dyn Harness) {
    const C: &str = "many_writers_one_order";
    let (store, sealer) = fresh(h, C).await;
    store
        .commit(change(
            vec![
                Op::CreateIdentity(identity("id-a", "a")),
                Op::PutJoinToken(join_token("once", "id-a", NOW + 600)),
            ],
            "setup",
        ))
        .await
        .unwrap_or_else(|e| panic!("{C}: {e}"));
    let mut tasks = Vec::new();
    for i in 0..200i64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut ops = vec![
                Op::AssertIdentityRevision {
                    id: "id-a".into(),
                    revision: 1,
                },
                Op::AppendLedger(ledger(CredentialKind::Jwt, "id-a", NOW + i)),
            ];
            if i % 4 == 0 {
                ops.push(Op::ConsumeJoinToken {
                    hash: "once".into(),
                    now: NOW,
                });
            }
            s.commit(change(ops, "jwt.mint")).await
        }));
    }
    let mut ok = 0u64;
    let mut used = 0;
    let mut seqs = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(c)) => {
                ok += 1;
                seqs.extend(c.audit_seqs);
            }
            Ok(Err(StoreError::Conflict(Conflict::JoinTokenUsed))) => used += 1,
            other => panic!("{C}: {other:?}"),
        }
    }
    assert_eq!(
        used, 49,
        "{C}: of 50 uses of one join token exactly one wins"
    );
    assert_eq!(ok, 151, "{C}");
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (2..=152).collect::<Vec<u64>>(),
        "{C}: one order, no gaps"
    );
    assert_eq!(store.ledger_len().await.ok(), Some(151), "{C}: ledger rows");
    chain_is_intact(&*store, &sealer, 152, C).await;
    store.close().await;
}

async fn retention_leaves_a_checkpoint_the_chain_verifies_from(h: &dyn Harness) {
    const C: &str = "retention_leaves_a_checkpoint_the_chain_verifies_from";
    let (store, sealer) = fresh(h, C).await;
    for i in 0..10 {
        store
            .commit(Change::audit_only(vec![draft("deny", &format!("t{i}"))]))
            .await
            .unwrap_or_else(|e| panic!("{C}: {e}"));
    }
    let sixth = store.audit_entries(6, 1).await.unwrap_or_default();
    let sixth: AuditEntry =
        serde_json::from_slice(&sixth[0].1).unwrap_or_else(|e| panic!("{C}: {e}"));
    // A checkpoint that is not on the chain is refused.
    let forged = Checkpoint::new(&sealer, 6, "00".repeat(32), NOW);
    let e = store
        .commit(Change {
            ops: vec![Op::PruneAudit { checkpoint: forged }],
            audit: vec![draft("audit.prune", "6")],
        })
        .await;
    assert!(
        matches!(e, Err(StoreError::Conflict(Conflict::AuditCheckpoint(6)))),
        "{C}: {e:?}"
    );
    let cp = Checkpoint::new(&sealer, 6, sixth.hash.clone(), NOW);
    store
        .commit(Change {
            ops: vec![Op::PruneAudit {
                checkpoint: cp.clone(),
            }],
            audit: vec![draft("audit.prune", "6")],
        })
        .await
        .unwrap_or_else(|e| panic!("{C}: prune: {e}"));
    let kept = store.audit_entries(1, 100).await.unwrap_or_default();
    assert_eq!(
        kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (7..=11).collect::<Vec<u64>>(),
        "{C}: entries up to the checkpoint are gone"
    );
    let stored = store.audit_checkpoint().await.ok().flatten();
    assert_eq!(stored.as_ref(), Some(&cp), "{C}: the checkpoint is stored");
    assert_eq!(
        verify_chain_from(&sealer, stored.as_ref(), kept.clone()),
        ChainReport::Intact { entries: 11 },
        "{C}: the kept chain verifies from the checkpoint"
    );
    assert!(
        matches!(
            verify_chain(&sealer, kept.clone()),
            ChainReport::Broken { .. }
        ),
        "{C}: and not without it"
    );
    // Moving the checkpoint or forging its hash is caught.
    let mut moved = cp.clone();
    moved.seq = 5;
    assert!(
        matches!(
            verify_chain_from(&sealer, Some(&moved), kept.clone()),
            ChainReport::Broken { .. }
        ),
        "{C}: a moved checkpoint"
    );
    assert_eq!(
        store.audit_head().await.ok(),
        Some(11),
        "{C}: the head stays"
    );
    store.close().await;
    let store = h
        .open(C, sealer.clone())
        .await
        .unwrap_or_else(|e| panic!("{C}: reopen: {e}"));
    let c = store
        .commit(Change::audit_only(vec![draft("deny", "after")]))
        .await
        .unwrap_or_else(|e| panic!("{C}: {e}"));
    assert_eq!(
        c.audit_seqs,
        vec![12],
        "{C}: the chain continues after reopening"
    );
    let kept = store.audit_entries(1, 100).await.unwrap_or_default();
    assert_eq!(
        verify_chain_from(&sealer, Some(&cp), kept),
        ChainReport::Intact { entries: 12 },
        "{C}"
    );
    store.close().await;
}

/// Everything the reads return, as one comparable value.
async fn everything(store: &dyn Store, check: &str) -> serde_json::Value {
    fn sorted<T: serde::Serialize>(mut v: Vec<T>, key: impl Fn(&T) -> String) -> serde_json::Value {
        v.sort_by_key(|x| key(x));
        serde_json::to_value(v).unwrap_or_default()
    }
    let fail = |what: &str, e: StoreError| -> ! { panic!("{check}: {what}: {e}") };
    let audit: Vec<(u64, String)> = store
        .audit_entries(1, usize::MAX)
        .await
        .unwrap_or_else(|e| fail("audit", e))
        .into_iter()
        .map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
        .collect();
    serde_json::json!({
        "meta": store.meta().await.unwrap_or_else(|e| fail("meta", e)),
        "identities": sorted(store.identities().await.unwrap_or_else(|e| fail("identities", e)), |r| r.id.clone()),
        "join_tokens": sorted(store.join_tokens().await.unwrap_or_else(|e| fail("tokens", e)), |r| r.hash.clone()),
        "keys": sorted(store.keys().await.unwrap_or_else(|e| fail("keys", e)), |r| r.id.clone()),
        "ledger": store.ledger_since(0, None).await.unwrap_or_else(|e| fail("ledger", e)),
        "ledger_len": store.ledger_len().await.unwrap_or_else(|e| fail("ledger_len", e)),
        "revocations": sorted(store.revocations().await.unwrap_or_else(|e| fail("revocations", e)), |r| r.credential_id.clone()),
        "usage": sorted(store.usage().await.unwrap_or_else(|e| fail("usage", e)), |r| r.identity_id.clone()),
        "owners": sorted(store.owners().await.unwrap_or_else(|e| fail("owners", e)), |r| r.name.clone()),
        "approvals": sorted(store.approvals().await.unwrap_or_else(|e| fail("approvals", e)), |r| r.id.clone()),
        "audit": audit,
        "audit_head": store.audit_head().await.unwrap_or_else(|e| fail("audit_head", e)),
        "checkpoint": store.audit_checkpoint().await.unwrap_or_else(|e| fail("checkpoint", e)),
        "anchor": store.audit_anchor().await.unwrap_or_else(|e| fail("anchor", e)),
    })
}

/// A file of its own for a backup (the suite runs without a temp-dir crate).
fn backup_path(check: &str, what: &str) -> std::path::PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!(
        "sigil-conformance-{}-{nanos}-{check}-{what}.backup",
        std::process::id()
    ))
}

/// A backup (taken while commits go on) restores into a new store of the same backend with
/// exactly the same state — records, audit chain with its hashes, checkpoint and anchor — and
/// the restored chain goes on. A truncated, edited, cut or foreign backup is refused and
/// leaves no store behind.
async fn a_backup_restores_the_same_state_and_refuses_a_bad_one(h: &dyn Harness) {
    const C: &str = "a_backup_restores_the_same_state_and_refuses_a_bad_one";
    let (store, sealer) = fresh(h, C).await;
    let a = identity("id-a", "a");
    let x = ledger(CredentialKind::X509, "id-a", NOW);
    let j = ledger(CredentialKind::Jwt, "id-a", NOW + 1);
    for ops in [
        vec![
            Op::CreateIdentity(a.clone()),
            Op::CreateIdentity(identity("id-b", "b")),
        ],
        vec![
            Op::PutJoinToken(join_token("h1", "id-b", NOW + 600)),
            Op::PutKey(key("k1", KeyState::Current)),
            Op::PutOwner(OwnerRecord {
                name: "alice".into(),
                deactivated_at: Some(NOW),
                changed_by: "op".into(),
                reason: "left".into(),
            }),
            Op::PutApproval(ApprovalRecord {
                id: "apr-1".into(),
                identity_id: "id-b".into(),
                scopes: ["admin".to_owned()].into(),
                created_at: NOW,
                expires_at: NOW + 60,
                approved_by: "op".into(),
                reason: "INC-1".into(),
                revoked_at: None,
                expiry_audited: false,
            }),
        ],
        vec![Op::AppendLedger(x.clone()), Op::AppendLedger(j.clone())],
        vec![Op::PutRevocation(revocation(&x))],
    ] {
        store
            .commit(change(ops, "setup"))
            .await
            .unwrap_or_else(|e| panic!("{C}: {e}"));
    }
    // Retention removed the first entries: the backup keeps the checkpoint.
    let second: AuditEntry =
        serde_json::from_slice(&store.audit_entries(2, 1).await.unwrap_or_default()[0].1)
            .unwrap_or_else(|e| panic!("{C}: {e}"));
    store
        .commit(Change {
            ops: vec![Op::PruneAudit {
                checkpoint: Checkpoint::new(&sealer, 2, second.hash, NOW),
            }],
            audit: vec![draft("audit.prune", "2")],
        })
        .await
        .unwrap_or_else(|e| panic!("{C}: prune: {e}"));

    // Taken while 40 changes commit: a consistent snapshot, whatever point it lands on.
    let path = backup_path(C, "good");
    let writers: Vec<_> = (0..40)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move {
                s.commit(Change::audit_only(vec![draft("deny", &format!("w{i}"))]))
                    .await
            })
        })
        .collect();
    let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{C}: {e}"));
    let summary = store
        .export(Box::new(std::io::BufWriter::new(file)))
        .await
        .unwrap_or_else(|e| panic!("{C}: export: {e}"));
    for w in writers {
        let _ = w.await;
    }
    assert_eq!(
        (
            summary.identities,
            summary.ledger,
            summary.revocations,
            summary.keys
        ),
        (2, 2, 1, 1),
        "{C}: what the backup says it holds"
    );
    let restored = h
        .restore(&format!("{C}-restored"), sealer.clone(), &path)
        .await
        .unwrap_or_else(|e| panic!("{C}: restore: {e}"));
    // The restored store is the store as it was when the backup was read: the chain up to
    // the backup's head.
    let mut want = everything(&*store, C).await;
    let head = summary.audit_head;
    if let Some(entries) = want["audit"].as_array_mut() {
        entries.retain(|e| e[0].as_u64().is_some_and(|s| s <= head));
    }
    want["audit_head"] = head.into();
    let got = everything(&*restored, C).await;
    want["anchor"] = got["anchor"].clone();
    assert_eq!(
        got, want,
        "{C}: the restored store holds what was backed up"
    );
    assert_eq!(
        got["anchor"]["seq"].as_u64(),
        Some(head),
        "{C}: anchored at the backup's head"
    );
    chain_is_intact(&*restored, &sealer, head, C).await;
    let c = restored
        .commit(Change::audit_only(vec![draft("deny", "after")]))
        .await
        .unwrap_or_else(|e| panic!("{C}: commit after restore: {e}"));
    assert_eq!(c.audit_seqs, vec![head + 1], "{C}: the chain goes on");
    restored.close().await;
    store.close().await;

    // Bad backups: refused, and no store is left behind.
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{C}: {e}"));
    let lines: Vec<&str> = text.lines().collect();
    let retrail = |body: &[&str], records: usize| -> String {
        let mut out = String::new();
        for l in body {
            out.push_str(l);
            out.push('\n');
        }
        let sha = ids::to_hex(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, out.as_bytes()).as_ref(),
        );
        out.push_str(&format!(
            "{{\"end\":{{\"records\":{records},\"sha256\":\"{sha}\"}}}}\n"
        ));
        out
    };
    let n = lines.len();
    let edited = text.replacen("\"leaked\"", "\"lEaked\"", 1);
    let cases: Vec<(&str, String, Arc<Sealer>)> = vec![
        (
            "truncated",
            lines[..n - 1].join("\n") + "\n",
            sealer.clone(),
        ),
        ("edited", edited, sealer.clone()),
        // The last audit entry removed and the trailer made to match (it needs no key):
        // the anchor says the chain was longer.
        ("cut", retrail(&lines[..n - 2], n - 3), sealer.clone()),
        ("foreign key", text.clone(), self::sealer()),
        ("empty", String::new(), sealer.clone()),
    ];
    for (what, body, key) in cases {
        let p = backup_path(C, what);
        std::fs::write(&p, body).unwrap_or_else(|e| panic!("{C}: {e}"));
        let name = format!("{C}-{}", what.replace(' ', "-"));
        let r = h.restore(&name, key.clone(), &p).await;
        assert!(
            matches!(r, Err(StoreError::Incompatible(_))),
            "{C}: a {what} backup is refused: {:?}",
            r.map(|_| ())
        );
        assert!(
            h.open(&name, key).await.is_err(),
            "{C}: a refused {what} backup leaves no store"
        );
        let _ = std::fs::remove_file(&p);
    }
    let _ = std::fs::remove_file(&path);
}
