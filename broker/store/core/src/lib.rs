//! Sigil's persistent state behind one trait, so business logic never names the backend.
//!
//! Every write is a [`Change`]: preconditions, mutations and the audit entries that describe
//! them, applied atomically — all of it durable, or none of it. Reads return committed state.
//!
//! Layout, in the order a change flows through it:
//! - [`model`]: the records (identities, join tokens, keys, ledger, revocations, usage, ...).
//! - [`Change`], [`Op`], [`Conflict`]: one durable unit of preconditions, mutations and audit.
//! - [`GroupCommit`]: the one writer every backend shares. It folds every waiting change into
//!   one transaction, checks each change's preconditions against the state before it (in
//!   commit order), stamps commit sequences, derives usage, chains the audit entries
//!   ([`audit`]), commits once, then tells the [`CommitObserver`] and answers each caller.
//! - [`backend`]: what a backend implements — a transaction that loads the rows a batch needs
//!   and writes what the batch decided ([`backend::Txn`]), and the reads ([`StoreReads`]).
//! - [`seal`]: the master key, sealing of secrets at rest, and the audit chain's key.
//! - [`dump`]: backups — one consistent snapshot as a file any backend restores from.
//! - [`conformance`]: the one test suite every backend passes.
//!
//! Backends live in their own crates (`sigil-store-redb`, ...); `sigil-store` opens one from a
//! configuration, and is the only crate the broker uses.

use std::fmt;
use std::sync::Weak;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sigil_pki::TrustDomain;

pub mod audit;
pub mod backend;
pub mod conformance;
pub mod dump;
pub mod model;
pub mod seal;
mod writer;

pub use writer::{GroupCommit, QUEUE as WRITER_QUEUE};

use crate::audit::AuditDraft;
use crate::model::{
    ApprovalRecord, IdentityRecord, JoinTokenRecord, KeyRecord, LedgerRecord, OwnerRecord,
    RevocationRecord, UsageRecord,
};

/// On-disk schema version this build reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

/// Facts about a store, fixed at `sigil init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreMeta {
    /// Schema version.
    pub schema_version: u64,
    /// The trust domain this store serves.
    pub trust_domain: TrustDomain,
    /// Unix seconds.
    pub created_at: i64,
}

/// One mutation inside a [`Change`]. Serializable: on a store shared by several writers
/// (broker replicas), the ops of every committed change travel through the store's commit log
/// to the other replicas' observers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Op {
    /// Adds an identity. Fails if its id or SPIFFE ID is taken.
    CreateIdentity(IdentityRecord),
    /// Replaces an identity. Fails unless the stored revision is `expected_revision`
    /// (the new record must carry `expected_revision + 1`).
    UpdateIdentity {
        /// The new record.
        record: IdentityRecord,
        /// The revision the caller read.
        expected_revision: u64,
    },
    /// Stores a join token (by hash).
    PutJoinToken(JoinTokenRecord),
    /// Marks a join token used. Fails unless it exists, is unused and unexpired at `now`.
    ConsumeJoinToken {
        /// Hex SHA-256 of the token.
        hash: String,
        /// Unix seconds.
        now: i64,
    },
    /// Fails unless the identity's stored revision is `revision`: the state the gates judged
    /// is still the state at commit (no suspend, retire or leak slipped in between).
    AssertIdentityRevision {
        /// Identity id.
        id: String,
        /// The revision the caller evaluated.
        revision: u64,
    },
    /// Adds or replaces a signing key.
    PutKey(KeyRecord),
    /// Records an issued credential.
    AppendLedger(LedgerRecord),
    /// Records a revoked credential.
    PutRevocation(RevocationRecord),
    /// Drops revocations of credentials that expired before `expired_before` (Unix seconds).
    PruneRevocations {
        /// Cut-off.
        expired_before: i64,
    },
    /// Adds or replaces an owner record.
    PutOwner(OwnerRecord),
    /// Adds or replaces an approval.
    PutApproval(ApprovalRecord),
    /// Removes the audit entries up to and including `checkpoint.seq` (retention), leaving
    /// `checkpoint` as where the kept chain starts. Fails unless the entry at `checkpoint.seq`
    /// exists, is not the newest, and has that hash.
    PruneAudit {
        /// Where the kept chain starts.
        checkpoint: crate::audit::Checkpoint,
    },
    /// Drops at most `limit` ledger records of credentials issued before `issued_before`
    /// (Unix seconds), oldest first (garbage collection of long-expired credentials).
    PruneLedger {
        /// Cut-off.
        issued_before: i64,
        /// Most rows in one commit, so issuance is never held up for long.
        limit: usize,
    },
}

/// An atomic unit of writes with the audit entries that describe it.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// Mutations; preconditions of all of them are checked against the state before the
    /// change, then all are applied.
    pub ops: Vec<Op>,
    /// Audit entries, appended to the chain in order.
    pub audit: Vec<AuditDraft>,
}

impl Change {
    /// A change that only records audit entries (e.g. a denial).
    pub fn audit_only(drafts: Vec<AuditDraft>) -> Self {
        Change {
            ops: Vec::new(),
            audit: drafts,
        }
    }
}

/// What a successful commit returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// Sequence numbers given to the change's audit entries.
    pub audit_seqs: Vec<u64>,
}

/// A precondition that did not hold; nothing of the change was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Conflict {
    /// Identity id taken.
    #[error("an identity with id {0} already exists")]
    IdentityIdTaken(String),
    /// SPIFFE ID taken.
    #[error("an identity with SPIFFE ID {0} already exists")]
    SpiffeIdTaken(String),
    /// Identity missing.
    #[error("identity {0} does not exist")]
    IdentityMissing(String),
    /// Someone else changed it first.
    #[error(
        "identity {id} was changed concurrently (expected revision {expected}, found {found}); retry"
    )]
    StaleRevision {
        /// Identity id.
        id: String,
        /// What the caller read.
        expected: u64,
        /// What is stored.
        found: u64,
    },
    /// Unknown join token.
    #[error("join token is unknown")]
    JoinTokenUnknown,
    /// Expired join token.
    #[error("join token expired")]
    JoinTokenExpired,
    /// Used join token.
    #[error("join token was already used")]
    JoinTokenUsed,
    /// An audit checkpoint that does not sit on the stored chain.
    #[error("audit checkpoint at entry {0} does not match the stored chain")]
    AuditCheckpoint(u64),
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A precondition failed; nothing was written.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The store cannot read or commit now (a write failed, the disk is full, the database is
    /// unreachable); a change that got this was not written. Fail closed.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The store refuses every change because its audit chain does not end where its anchor
    /// says (entries were cut from its end, or the file was put back to an older copy):
    /// appending would bury the evidence. Reads still work, so operators can look.
    #[error("the store refuses changes: {0}")]
    Tampered(String),
    /// Too many changes are waiting for the store: this one was refused at once, unwritten.
    #[error("the store is overloaded: {0}")]
    Overloaded(String),
    /// The store could not be opened (missing, unreadable, damaged); nothing was written.
    #[error("the store could not be opened: {0}")]
    Open(String),
    /// The data dir cannot be used by this build or with this key.
    #[error("{0}")]
    Incompatible(String),
    /// Stored data does not parse.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The store is closed.
    #[error("the store is shut down")]
    Closed,
    /// A replica fell further behind the shared commit log than the log reaches back: its
    /// in-memory views can no longer catch up change by change (restart it to reload them).
    #[error("this replica is behind the commit log by more than it keeps: {0}")]
    Behind(String),
}

/// Told about every committed change, in commit order, before the committer hears back: the
/// broker's in-memory views (registry, revocations, keys, watch streams) follow the store this
/// way. On a store shared by replicas, the changes other replicas committed arrive here too,
/// in the same order on every replica.
pub trait CommitObserver: Send + Sync {
    /// `ops` of the changes that just became durable.
    fn committed(&self, ops: &[&Op]);
}

/// Makes a store's writes fail while on, whatever the backend (a full disk, a lost database):
/// for testing that issuance fails closed and that the writer recovers, and for chaos drills.
/// Backends honour it only when built with their `faults` feature.
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl FaultSwitch {
    /// Turns write failures on or off.
    pub fn fail_writes(&self, on: bool) {
        self.0.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether writes fail now.
    pub fn failing(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Everything the broker persists: the reads, plus committing changes.
#[async_trait]
pub trait Store: StoreReads {
    /// Applies `change` atomically and durably, or not at all.
    async fn commit(&self, change: Change) -> Result<Committed, StoreError>;

    /// Registers the observer of committed changes (held weakly).
    fn set_observer(&self, observer: Weak<dyn CommitObserver>);

    /// `Err(reason)` when the last commit failed for a storage reason (the broker cannot issue
    /// until that clears), or, on a store shared by replicas, while this one is not following
    /// the others' commits; `Ok` otherwise. Cheap: for readiness checks.
    fn health(&self) -> Result<(), String>;

    /// Whether this writer runs the schedules (rotation, pruning): always, unless replicas
    /// share the store, where exactly one of them does at a time.
    fn is_leader(&self) -> bool {
        true
    }

    /// Returns once this process's in-memory views hold every change committed (by any
    /// replica sharing the store) before the call: read-your-writes across replicas, for a
    /// lookup that missed (an identity created through another replica a moment ago). At
    /// once for a store with one writer.
    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// `Some(why)` when this process cannot get well again without a restart (a replica that
    /// fell further behind the shared commit log than it keeps: only a restart reloads its
    /// views from a snapshot): liveness fails, so a supervisor restarts it.
    fn fatal(&self) -> Option<String> {
        None
    }

    /// Flushes and stops the writer; later commits fail with [`StoreError::Closed`].
    async fn close(&self);
}

/// The reads of committed state, the same for every backend.
#[async_trait]
pub trait StoreReads: Send + Sync + fmt::Debug + 'static {
    /// Facts fixed at init.
    async fn meta(&self) -> Result<StoreMeta, StoreError>;

    /// Every identity.
    async fn identities(&self) -> Result<Vec<IdentityRecord>, StoreError>;

    /// A join token by hash.
    async fn join_token(&self, hash: &str) -> Result<Option<JoinTokenRecord>, StoreError>;

    /// Every signing key.
    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError>;

    /// A ledger record by credential id (serial bytes or `jti` bytes).
    async fn ledger_record(&self, credential_id: &[u8])
    -> Result<Option<LedgerRecord>, StoreError>;

    /// Number of ledger records.
    async fn ledger_len(&self) -> Result<u64, StoreError>;

    /// Ledger records issued at or after `since` (Unix seconds), optionally of one identity,
    /// oldest first.
    async fn ledger_since(
        &self,
        since: i64,
        identity_id: Option<String>,
    ) -> Result<Vec<LedgerRecord>, StoreError>;

    /// Every stored revocation.
    async fn revocations(&self) -> Result<Vec<RevocationRecord>, StoreError>;

    /// Usage of every identity that was ever issued a credential (derived from the ledger in
    /// the same commit as each ledger record).
    async fn usage(&self) -> Result<Vec<UsageRecord>, StoreError>;

    /// Every owner record (owners are implicit until one is deactivated).
    async fn owners(&self) -> Result<Vec<OwnerRecord>, StoreError>;

    /// Every approval, in force or not.
    async fn approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError>;

    /// How many ledger records (at most `limit`) were issued before `issued_before`.
    async fn ledger_count_before(
        &self,
        issued_before: i64,
        limit: usize,
    ) -> Result<usize, StoreError>;

    /// Every join token (hashes only), used or not.
    async fn join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError>;

    /// The sequence number of the newest audit entry (0 when there is none).
    async fn audit_head(&self) -> Result<u64, StoreError>;

    /// Raw audit entries (stored JSON) with sequence numbers from `from_seq`, at most `limit`.
    async fn audit_entries(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    /// Where the kept audit chain starts, once retention removed older entries.
    async fn audit_checkpoint(&self) -> Result<Option<crate::audit::Checkpoint>, StoreError>;

    /// The anchor of the audit chain's end (none before the first entry).
    async fn audit_anchor(&self) -> Result<Option<crate::audit::Anchor>, StoreError>;

    /// Writes every record of one consistent snapshot to `out` as a backup ([`dump`]), while
    /// commits go on.
    async fn export(
        &self,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<dump::Summary, StoreError>;
}
