//! What a backend implements: the reads ([`crate::StoreReads`]) and one transaction per batch
//! ([`Txn`]). Everything else — preconditions, commit order, usage, audit chaining, the
//! commit observer — is [`crate::GroupCommit`]'s, the same for every backend.
//!
//! A batch runs in three steps, so a backend that talks to a server does a few round trips per
//! batch, not per change: [`Txn::load`] fetches every row the batch's preconditions and writes
//! need ([`Needs`]), the writer decides each change in memory, and [`Txn::write`] applies
//! what it decided ([`Write`]s, in commit order), then [`Txn::commit`] makes it durable.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;

use crate::audit::ChainHead;
use crate::model::{
    ApprovalRecord, IdentityRecord, JoinTokenRecord, KeyRecord, LedgerRecord, OwnerRecord,
    RevocationRecord, UsageRecord,
};
use crate::{Op, StoreError, StoreReads};

/// A storage backend.
#[async_trait(?Send)]
pub trait Backend: StoreReads {
    /// Starts the transaction of one batch. Only the writer calls this, one batch at a time.
    async fn begin(&self) -> Result<Box<dyn Txn + '_>, StoreError>;

    /// Releases the backend's resources once the writer has stopped (called once).
    fn shut_down(&self);

    /// Brings the backend back after a batch failed for a storage reason (redb refuses every
    /// operation after one write error until the file is reopened; a database client
    /// reconnects), and proves it can commit again. Returns the audit chain's head as now
    /// committed — the failed batch may or may not have become durable, and the writer goes on
    /// from what is. The writer retries this with backoff until it succeeds.
    ///
    /// The default runs an empty transaction and reads the head.
    async fn recover(&self) -> Result<ChainHead, StoreError> {
        let mut txn = self.begin().await?;
        let head = txn.load(&Needs::default()).await?.head;
        txn.commit().await?;
        Ok(head)
    }

    /// The audit chain's anchor, its last sequence number and that entry as stored, read in
    /// one snapshot (so a commit between the reads cannot look like a cut chain).
    async fn chain_end(&self) -> Result<ChainEnd, StoreError> {
        let anchor = self.audit_anchor().await?;
        let seq = self.audit_head().await?;
        let last = if seq == 0 {
            None
        } else {
            self.audit_entries(seq, 1)
                .await?
                .into_iter()
                .next()
                .map(|(_, b)| b)
        };
        Ok(ChainEnd { anchor, seq, last })
    }

    /// Whether other writers share this store (broker replicas on one database). Their
    /// committed changes then reach this writer through [`Backend::changes_after`] and
    /// [`Backend::next_change`], and [`Txn::load`] reports the commit log's position.
    fn shared(&self) -> bool {
        false
    }

    /// The commit log's position now (the last committed change's), for a shared store.
    async fn log_position(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// The changes committed after log position `after`, oldest first, each with its position
    /// (a shared store). [`StoreError::Behind`] when the log no longer reaches back that far.
    async fn changes_after(&self, after: u64) -> Result<Vec<(u64, Vec<Op>)>, StoreError> {
        let _ = after;
        Ok(Vec::new())
    }

    /// Waits until another writer may have committed — a notification, or a slow safety check
    /// — and returns the newest log position known; an error when the feed of notifications
    /// was lost (the caller says it is not following, and calls again to reconnect). Must be
    /// cancel-safe. Never returns for a store with one writer.
    async fn next_change(&self) -> Result<u64, StoreError> {
        std::future::pending().await
    }

    /// Tries to become, or stay, the one writer that runs schedules among those sharing the
    /// store; `true` while it is.
    async fn lead(&self) -> bool {
        true
    }
}

/// The end of the audit chain as stored (see [`Backend::chain_end`]).
#[derive(Debug, Clone, Default)]
pub struct ChainEnd {
    /// The anchor.
    pub anchor: Option<crate::audit::Anchor>,
    /// The last entry's sequence number (0: none).
    pub seq: u64,
    /// The last entry as stored.
    pub last: Option<Vec<u8>>,
}

/// The transaction of one batch.
#[async_trait(?Send)]
pub trait Txn {
    /// The rows named in `needs` as committed now, and the audit chain's head. Rows that do
    /// not exist are absent from the maps.
    async fn load(&mut self, needs: &Needs) -> Result<Loaded, StoreError>;

    /// Applies `writes` in order.
    async fn write(&mut self, writes: &[Write<'_>]) -> Result<(), StoreError>;

    /// Makes everything written durable, or nothing.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// The rows a batch needs read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Needs {
    /// Identities whose whole record is needed (created or updated in the batch).
    pub identities: BTreeSet<String>,
    /// Identities whose revision is needed (asserted in the batch).
    pub revisions: BTreeSet<String>,
    /// SPIFFE IDs whose owner (identity id) is needed.
    pub spiffe_ids: BTreeSet<String>,
    /// Join tokens (by hash) consumed in the batch.
    pub join_tokens: BTreeSet<String>,
    /// Identities whose usage the batch's ledger records change.
    pub usage: BTreeSet<String>,
    /// Audit entries a retention checkpoint is placed on.
    pub audit: BTreeSet<u64>,
}

/// What [`Txn::load`] found.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    /// Identity id → record.
    pub identities: HashMap<String, IdentityRecord>,
    /// Identity id → revision.
    pub revisions: HashMap<String, u64>,
    /// SPIFFE ID → identity id.
    pub spiffe_ids: HashMap<String, String>,
    /// Join token hash → record.
    pub join_tokens: HashMap<String, JoinTokenRecord>,
    /// Identity id → usage.
    pub usage: HashMap<String, UsageRecord>,
    /// Audit sequence → that entry's chain hash.
    pub audit_hashes: HashMap<u64, String>,
    /// The audit chain after its last entry.
    pub head: ChainHead,
    /// On a shared store, the commit log's position (the last committed change's); the
    /// batch's changes are logged at the next one.
    pub log_seq: u64,
}

/// One write the batch decided, in commit order.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Write<'a> {
    /// Inserts or replaces an identity (and its revision and SPIFFE ID index entry).
    PutIdentity {
        /// The record.
        record: &'a IdentityRecord,
        /// The SPIFFE ID the stored record had, when it changes (its index entry goes).
        replaces_spiffe_id: Option<String>,
    },
    /// Inserts or replaces a join token.
    PutJoinToken(Cow<'a, JoinTokenRecord>),
    /// Inserts or replaces a key.
    PutKey(&'a KeyRecord),
    /// Appends a ledger record.
    AppendLedger(&'a LedgerRecord),
    /// Inserts a revocation.
    PutRevocation(&'a RevocationRecord),
    /// Drops revocations of credentials that expired before this (Unix seconds).
    PruneRevocations {
        /// Cut-off.
        expired_before: i64,
    },
    /// Drops at most `limit` ledger records issued before `issued_before`, oldest first.
    PruneLedger {
        /// Cut-off (Unix seconds).
        issued_before: i64,
        /// Most rows.
        limit: usize,
    },
    /// Inserts or replaces an owner.
    PutOwner(&'a OwnerRecord),
    /// Inserts or replaces an approval.
    PutApproval(&'a ApprovalRecord),
    /// Replaces an identity's usage.
    PutUsage {
        /// The identity.
        identity_id: String,
        /// Its usage now.
        usage: UsageRecord,
    },
    /// Removes the audit entries up to `checkpoint.seq` and stores the checkpoint.
    PruneAudit(&'a crate::audit::Checkpoint),
    /// Replaces the anchor of the audit chain's end (once per batch that appends entries,
    /// after them).
    PutAnchor(crate::audit::Anchor),
    /// On a shared store: logs the batch's committed ops at the next log position, for the
    /// other writers' observers (once per batch that has ops, last). Others ignore it.
    Log(Vec<&'a Op>),
    /// Appends an audit entry (already chained).
    AppendAudit {
        /// Its sequence number.
        seq: u64,
        /// Its chain hash.
        hash: String,
        /// Its JSON encoding, as stored and verified.
        bytes: Vec<u8>,
    },
}

/// Helpers every backend uses alike: how records are encoded as stored bytes, and the errors
/// a backend reports.
pub mod codec {
    use crate::StoreError;

    /// A record's stored bytes.
    pub fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
        // Records are plain data with string keys: serialising them cannot fail.
        serde_json::to_vec(v).unwrap_or_default()
    }

    /// A record from its stored bytes; `what` names the table and key in the error.
    pub fn decode<T: serde::de::DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(b).map_err(|e| corrupt(what, e))
    }

    /// The storage cannot do it now (fail closed).
    pub fn unavailable(e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(e.to_string())
    }

    /// Stored data does not decode; `what` names where.
    pub fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(format!("{what}: {e}"))
    }
}
