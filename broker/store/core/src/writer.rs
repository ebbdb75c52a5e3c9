//! The group-committing writer every backend shares.
//!
//! One writer thread owns every write. It takes every change that is waiting (up to
//! [`MAX_BATCH`]), loads the rows they need in one go, decides each change in commit order
//! against the state before it (the committed state plus the batch's earlier changes), writes
//! what it decided, commits once — one transaction and one fsync for the whole batch — and
//! only then tells the commit observer and answers each caller.
//!
//! The thread runs its own single-threaded runtime, so a backend's transaction may be
//! synchronous (redb: blocking this thread, never a request's) or asynchronous (a database
//! client).

use std::borrow::Cow;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use crate::audit::ChainHead;
use crate::backend::{Backend, Loaded, Needs, Write};
use crate::model::{
    ApprovalRecord, IdentityRecord, JoinTokenRecord, KeyRecord, LedgerRecord, OwnerRecord,
    RevocationRecord, UsageRecord,
};
use crate::seal::Sealer;
use crate::{
    Change, CommitObserver, Committed, Conflict, Op, Store, StoreError, StoreMeta, StoreReads,
};

/// Most changes folded into one transaction.
pub(crate) const MAX_BATCH: usize = 2048;
/// Most changes waiting for the writer by default: beyond that, new ones are shed at once
/// with [`StoreError::Overloaded`] rather than queued (memory stays bounded under overload,
/// and a caller learns to back off instead of waiting ever longer).
pub const QUEUE: usize = 16_384;

type Observer = Arc<RwLock<Option<Weak<dyn CommitObserver>>>>;

struct Job {
    change: Change,
    reply: oneshot::Sender<Result<Committed, StoreError>>,
}

/// A [`Store`] over a backend: reads go to the backend, changes to the shared writer.
pub struct GroupCommit<B: Backend> {
    backend: Arc<B>,
    /// `None` once closed; dropping the last sender lets the writer drain and exit.
    tx: ArcSwapOption<mpsc::Sender<Job>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    state: Arc<WriterState>,
    observer: Observer,
}

/// What the writer thread reports to the store's handle.
#[derive(Debug, Default)]
struct WriterState {
    /// The last commit failure, cleared by the next successful commit.
    failure: Mutex<Option<String>>,
    /// On a shared store: why this writer is not following the others' commits, if it is not.
    feed: Mutex<Option<String>>,
    /// On a shared store: whether this writer holds the schedules.
    leader: std::sync::atomic::AtomicBool,
    /// Set when only a restart can help (see [`Store::fatal`]).
    fatal: Mutex<Option<String>>,
}

impl<B: Backend> std::fmt::Debug for GroupCommit<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> GroupCommit<B> {
    /// Starts the writer over `backend`; `sealer` keys the audit chain. On a store shared by
    /// replicas, returns once the writer knows the commit log's position, so that views read
    /// from the store afterwards miss none of the changes it will pass on.
    pub fn start(backend: B, sealer: Arc<Sealer>) -> Result<Self, StoreError> {
        Self::start_with_queue(backend, sealer, QUEUE)
    }

    /// [`GroupCommit::start`] with at most `queue` changes waiting (at least 1).
    pub fn start_with_queue(
        backend: B,
        sealer: Arc<Sealer>,
        queue: usize,
    ) -> Result<Self, StoreError> {
        let backend = Arc::new(backend);
        let (tx, rx) = mpsc::channel(queue.max(1));
        let state = Arc::new(WriterState {
            leader: std::sync::atomic::AtomicBool::new(!backend.shared()),
            ..WriterState::default()
        });
        let observer: Observer = Arc::default();
        let (wb, ws, wo) = (backend.clone(), state.clone(), observer.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("store writer runtime: {e}")))?;
        let (started_tx, started) = std::sync::mpsc::sync_channel(1);
        let writer = std::thread::Builder::new()
            .name("sigil-store-writer".into())
            .spawn(move || {
                rt.block_on(writer_loop(&*wb, &sealer, rx, &ws, &wo, started_tx));
                wb.shut_down();
            })
            .map_err(|e| StoreError::Unavailable(format!("store writer thread: {e}")))?;
        // The writer says where the log stands (or why it could not), at once for a store
        // with one writer.
        match started.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(StoreError::Unavailable(
                    "the store writer stopped while starting".into(),
                ));
            }
        }
        Ok(GroupCommit {
            backend,
            tx: ArcSwapOption::from_pointee(tx),
            writer: Mutex::new(Some(writer)),
            state,
            observer,
        })
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

/// How often a writer sharing the store tries to take (or keep) the schedules.
const LEAD_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// On a shared store, where this writer's observer stands in the commit log.
struct Follow {
    shared: bool,
    /// The last log position whose changes the observer has heard.
    applied: u64,
}

impl Follow {
    /// Passes the changes committed after `applied` (by other writers) to the observer, in
    /// order. Without an observer yet, nothing is passed and `applied` stays (the views read
    /// after it is set include them).
    async fn catch_up<B: Backend>(
        &mut self,
        backend: &B,
        observer: &Observer,
    ) -> Result<(), StoreError> {
        if !self.shared || observer_of(observer).is_none() {
            return Ok(());
        }
        for (pos, ops) in backend.changes_after(self.applied).await? {
            let refs: Vec<&Op> = ops.iter().collect();
            notify(observer, &refs);
            self.applied = pos;
        }
        Ok(())
    }
}

async fn writer_loop<B: Backend>(
    backend: &B,
    sealer: &Sealer,
    mut rx: mpsc::Receiver<Job>,
    state: &WriterState,
    observer: &Observer,
    started: std::sync::mpsc::SyncSender<Result<(), StoreError>>,
) {
    let failure = &state.failure;
    let shared = backend.shared();
    let mut follow = Follow { shared, applied: 0 };
    if shared {
        match backend.log_position().await {
            Ok(p) => follow.applied = p,
            Err(e) => {
                let _ = started.send(Err(e));
                return;
            }
        }
    }
    // A chain whose end does not match its anchor was cut (or rolled back) while the broker
    // was down. Appending to it would overwrite the anchor and bury the evidence: refuse every
    // change instead, and say why (readiness fails; `audit verify` shows the details).
    if let Err(why) = check_anchor(backend, sealer).await {
        let _ = started.send(Ok(()));
        tracing::error!(error = %why, "refusing every change to this store");
        if let Ok(mut f) = failure.lock() {
            *f = Some(why.clone());
        }
        while let Some(j) = rx.recv().await {
            let _ = j.reply.send(Err(StoreError::Tampered(why.clone())));
        }
        return;
    }
    let _ = started.send(Ok(()));
    let mut lead = tokio::time::interval(LEAD_EVERY);
    lead.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After the feed of other writers' commits was lost: when to reconnect, and how long the
    // next wait is.
    let mut feed_retry: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut feed_backoff = RECOVER_FIRST;
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            job = rx.recv() => match job {
                Some(j) => j,
                None => break,
            },
            () = async { if let Some(s) = feed_retry.as_mut() { s.await } }, if feed_retry.is_some() => {
                feed_retry = None;
                continue;
            }
            news = backend.next_change(), if shared && feed_retry.is_none() && observer_of(observer).is_some() => {
                let caught = match news {
                    Ok(pos) if pos > follow.applied => follow.catch_up(backend, observer).await,
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                };
                match caught {
                    Ok(()) => {
                        if let Ok(mut f) = state.feed.lock() && f.take().is_some() {
                            tracing::info!(log = follow.applied, "following the other replicas' commits again");
                        }
                        feed_backoff = RECOVER_FIRST;
                    }
                    Err(e) => {
                        let why = format!("not following the other replicas' commits: {e}");
                        if let Ok(mut f) = state.feed.lock() {
                            if f.is_none() {
                                tracing::warn!(error = %e, "lost the commit feed; reconnecting");
                            }
                            *f = Some(why);
                        }
                        if matches!(e, StoreError::Behind(_)) {
                            metrics::counter!("sigil_store_behind_total").increment(1);
                            tracing::error!(error = %e, "this replica is further behind than the commit log keeps; failing liveness so it is restarted and reloads from a snapshot");
                            if let Ok(mut f) = state.fatal.lock() {
                                *f = Some(e.to_string());
                            }
                        }
                        feed_retry = Some(Box::pin(tokio::time::sleep(feed_backoff)));
                        feed_backoff = (feed_backoff * 2).min(RECOVER_MAX);
                    }
                }
                continue;
            }
            _ = lead.tick(), if shared => {
                let leads = backend.lead().await;
                let was = state.leader.swap(leads, std::sync::atomic::Ordering::SeqCst);
                metrics::gauge!("sigil_schedule_leader").set(if leads { 1.0 } else { 0.0 });
                if was != leads {
                    tracing::info!(leader = leads, "schedules (rotation, pruning) {}", if leads { "run here now" } else { "run on another replica now" });
                }
                continue;
            }
        };
        jobs.push(first);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let batch_size = jobs.len();
        let started = std::time::Instant::now();
        match apply_batch(backend, sealer, &mut jobs, &mut follow, observer).await {
            Ok(results) => {
                if let Ok(mut f) = failure.lock() {
                    f.take();
                }
                // In-memory views catch up before anyone hears the commit succeeded.
                let ops: Vec<&Op> = jobs
                    .iter()
                    .zip(&results)
                    .filter(|(_, r)| r.is_ok())
                    .flat_map(|(j, _)| j.change.ops.iter())
                    .collect();
                notify(observer, &ops);
                for (job, result) in jobs.drain(..).zip(results) {
                    let _ = job.reply.send(result.map_err(StoreError::from));
                }
            }
            Err(failed) => {
                let e = failed.error;
                set_failure(failure, &e);
                tracing::error!(error = %e, batch_size, "store commit failed; every change in the batch was refused");
                metrics::counter!("sigil_store_commit_failures_total").increment(1);
                let reason = reason_of(&e);
                // What the batch would have made durable, in case it did after all (the error
                // can come after the data reached the disk, e.g. from the last fsync).
                let maybe: Vec<Op> = failed
                    .accepted
                    .iter()
                    .flat_map(|&i| jobs[i].change.ops.iter().cloned())
                    .collect();
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(StoreError::Unavailable(reason.clone())));
                }
                metrics::histogram!("sigil_store_commit_batch_size").record(batch_size as f64);
                let Some(head) = recover(backend, &mut rx, failure, reason).await else {
                    return;
                };
                // The callers were told it failed; if it was durable after all, the views must
                // still follow the store (an identity revoked is revoked). A shared store's
                // log says so itself: catching up replays it if it is there.
                if shared {
                    if let Err(e) = follow.catch_up(backend, observer).await {
                        tracing::warn!(error = %e, "catching up after recovering");
                    }
                } else if let Some(end) = failed.end
                    && head == end
                {
                    tracing::warn!(
                        seq = end.seq,
                        "the failed batch turned out durable; applying it to the in-memory views"
                    );
                    let ops: Vec<&Op> = maybe.iter().collect();
                    notify(observer, &ops);
                }
                if let Ok(mut f) = failure.lock() {
                    f.take();
                }
                tracing::info!(
                    audit_head = head.seq,
                    "the store recovered; committing again"
                );
                continue;
            }
        }
        metrics::histogram!("sigil_store_commit_batch_size").record(batch_size as f64);
        metrics::histogram!("sigil_store_commit_seconds").record(started.elapsed().as_secs_f64());
    }
}

/// `Err(why)` unless the stored chain ends exactly where its anchor says.
async fn check_anchor<B: Backend>(backend: &B, sealer: &Sealer) -> Result<(), String> {
    let read = |e: StoreError| format!("could not check the audit chain's anchor: {e}");
    let end = backend.chain_end().await.map_err(read)?;
    let (anchor, seq) = (end.anchor, end.seq);
    let restore = "Issuance is refused so that the evidence is not overwritten: run `sigil audit verify --offline`, and restore the data dir from a backup";
    let hash = match &end.last {
        None => ChainHead::default().hash,
        Some(bytes) => {
            serde_json::from_slice::<crate::audit::AuditEntry>(bytes)
                .map_err(|e| format!("the last audit entry ({seq}) does not decode: {e}"))?
                .hash
        }
    };
    match anchor {
        None if seq == 0 => Ok(()),
        None => Err(format!(
            "the audit chain (ending at entry {seq}) has no anchor of its end: it was removed. {restore}"
        )),
        Some(a) if !a.verify(sealer) => Err(format!(
            "the anchor of the audit chain's end does not verify with this master key (forged). {restore}"
        )),
        Some(a) if a.seq != seq || a.hash != hash => Err(format!(
            "the audit chain ends at entry {seq} but its end was anchored at entry {}: entries were removed from its end, or the store was put back to an older copy. {restore}",
            a.seq
        )),
        Some(_) => Ok(()),
    }
}

fn observer_of(observer: &Observer) -> Option<Arc<dyn CommitObserver>> {
    observer
        .read()
        .ok()
        .and_then(|o| o.as_ref().and_then(Weak::upgrade))
}

fn notify(observer: &Observer, ops: &[&Op]) {
    if ops.is_empty() {
        return;
    }
    if let Some(obs) = observer_of(observer) {
        obs.committed(ops);
    }
}

fn set_failure(failure: &Mutex<Option<String>>, e: &StoreError) {
    if let Ok(mut f) = failure.lock() {
        *f = Some(e.to_string());
    }
}

fn reason_of(e: &StoreError) -> String {
    match e {
        StoreError::Unavailable(r) => r.clone(),
        other => other.to_string(),
    }
}

/// First wait before recovering, and the most between attempts.
const RECOVER_FIRST: std::time::Duration = std::time::Duration::from_millis(50);
const RECOVER_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Recovers the backend after a failed batch, with backoff, refusing at once every change
/// that arrives meanwhile (the store is not ready, and `health` says why). Returns the chain
/// head as committed, or `None` if the store was closed meanwhile.
async fn recover<B: Backend>(
    backend: &B,
    rx: &mut mpsc::Receiver<Job>,
    failure: &Mutex<Option<String>>,
    mut reason: String,
) -> Option<ChainHead> {
    let mut delay = RECOVER_FIRST;
    let mut attempts: u64 = 0;
    loop {
        let wait = tokio::time::sleep(delay);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                job = rx.recv() => match job {
                    Some(j) => {
                        let _ = j.reply.send(Err(StoreError::Unavailable(format!(
                            "recovering from a failed commit: {reason}"
                        ))));
                    }
                    None => return None,
                },
            }
        }
        attempts += 1;
        metrics::counter!("sigil_store_recovery_attempts_total").increment(1);
        match backend.recover().await {
            Ok(head) => return Some(head),
            Err(e) => {
                set_failure(failure, &e);
                reason = reason_of(&e);
                // Once per attempt, and attempts back off: at most one line every few seconds.
                tracing::warn!(error = %e, attempts, "the store has not recovered yet; retrying");
                delay = (delay * 2).min(RECOVER_MAX);
            }
        }
    }
}

/// Every row the batch's preconditions and writes read.
fn needs_of(jobs: &[Job]) -> Needs {
    let mut n = Needs::default();
    for op in jobs.iter().flat_map(|j| &j.change.ops) {
        match op {
            Op::CreateIdentity(r) => {
                n.identities.insert(r.id.clone());
                n.spiffe_ids.insert(r.spiffe_id.to_string());
            }
            Op::UpdateIdentity { record, .. } => {
                n.identities.insert(record.id.clone());
                n.spiffe_ids.insert(record.spiffe_id.to_string());
            }
            Op::AssertIdentityRevision { id, .. } => {
                n.revisions.insert(id.clone());
            }
            Op::ConsumeJoinToken { hash, .. } => {
                n.join_tokens.insert(hash.clone());
            }
            Op::AppendLedger(r) if !r.identity_id.is_empty() => {
                n.usage.insert(r.identity_id.clone());
            }
            Op::PruneAudit { checkpoint } => {
                n.audit.insert(checkpoint.seq);
            }
            _ => {}
        }
    }
    n
}

/// The state the batch decides against: what was committed, then each accepted change.
struct View {
    loaded: Loaded,
    /// Identities whose usage changed, in the order first touched.
    usage_touched: Vec<String>,
}

impl View {
    fn revision(&self, id: &str) -> Option<u64> {
        self.loaded
            .identities
            .get(id)
            .map(|r| r.revision)
            .or_else(|| self.loaded.revisions.get(id).copied())
    }

    /// `Err(conflict)` when a precondition of `change` does not hold now.
    fn check(&self, change: &Change) -> Result<(), Conflict> {
        for op in &change.ops {
            match op {
                Op::CreateIdentity(rec) => {
                    if self.loaded.identities.contains_key(&rec.id)
                        || self.loaded.revisions.contains_key(&rec.id)
                    {
                        return Err(Conflict::IdentityIdTaken(rec.id.clone()));
                    }
                    if self.loaded.spiffe_ids.contains_key(rec.spiffe_id.as_str()) {
                        return Err(Conflict::SpiffeIdTaken(rec.spiffe_id.to_string()));
                    }
                }
                Op::UpdateIdentity {
                    record,
                    expected_revision,
                } => {
                    let Some(stored) = self.loaded.identities.get(&record.id) else {
                        return Err(Conflict::IdentityMissing(record.id.clone()));
                    };
                    if stored.revision != *expected_revision {
                        return Err(Conflict::StaleRevision {
                            id: record.id.clone(),
                            expected: *expected_revision,
                            found: stored.revision,
                        });
                    }
                    if stored.spiffe_id != record.spiffe_id
                        && let Some(owner) = self.loaded.spiffe_ids.get(record.spiffe_id.as_str())
                        && *owner != record.id
                    {
                        return Err(Conflict::SpiffeIdTaken(record.spiffe_id.to_string()));
                    }
                }
                Op::ConsumeJoinToken { hash, now } => {
                    let Some(rec) = self.loaded.join_tokens.get(hash) else {
                        return Err(Conflict::JoinTokenUnknown);
                    };
                    if rec.consumed_at.is_some() {
                        return Err(Conflict::JoinTokenUsed);
                    }
                    if rec.expires_at <= *now {
                        return Err(Conflict::JoinTokenExpired);
                    }
                }
                Op::AssertIdentityRevision { id, revision } => match self.revision(id) {
                    None => return Err(Conflict::IdentityMissing(id.clone())),
                    Some(r) if r != *revision => {
                        return Err(Conflict::StaleRevision {
                            id: id.clone(),
                            expected: *revision,
                            found: r,
                        });
                    }
                    Some(_) => {}
                },
                Op::PruneAudit { checkpoint } => {
                    let on_chain = self
                        .loaded
                        .audit_hashes
                        .get(&checkpoint.seq)
                        .is_some_and(|h| *h == checkpoint.hash);
                    if !on_chain || checkpoint.seq >= self.loaded.head.seq {
                        return Err(Conflict::AuditCheckpoint(checkpoint.seq));
                    }
                }
                Op::PutJoinToken(_)
                | Op::PutKey(_)
                | Op::AppendLedger(_)
                | Op::PutRevocation(_)
                | Op::PruneRevocations { .. }
                | Op::PutOwner(_)
                | Op::PutApproval(_)
                | Op::PruneLedger { .. } => {}
            }
        }
        Ok(())
    }

    /// Applies an accepted change to the view: stamps `commit_seq` (its place in commit
    /// order) on join tokens it creates and on identities whose status it changes, and
    /// returns what each op needs beyond its own record.
    fn apply(&mut self, change: &mut Change, commit_seq: u64) -> Vec<Extra> {
        let mut extras = Vec::with_capacity(change.ops.len());
        for op in &mut change.ops {
            let extra = match op {
                Op::CreateIdentity(rec) => {
                    rec.status_seq = commit_seq;
                    self.put_identity(rec);
                    Extra::None
                }
                Op::UpdateIdentity { record, .. } => {
                    let old = self.loaded.identities.get(&record.id);
                    record.status_seq = match old {
                        Some(o) if o.status == record.status => o.status_seq,
                        _ => commit_seq,
                    };
                    let replaces = old
                        .filter(|o| o.spiffe_id != record.spiffe_id)
                        .map(|o| o.spiffe_id.to_string());
                    if let Some(s) = &replaces {
                        self.loaded.spiffe_ids.remove(s);
                    }
                    self.put_identity(record);
                    Extra::ReplacesSpiffeId(replaces)
                }
                Op::PutJoinToken(rec) => {
                    rec.created_seq = commit_seq;
                    self.loaded
                        .join_tokens
                        .insert(rec.hash.clone(), rec.clone());
                    Extra::None
                }
                Op::ConsumeJoinToken { hash, now } => match self.loaded.join_tokens.get_mut(hash) {
                    Some(rec) => {
                        rec.consumed_at = Some(*now);
                        Extra::Consumed(rec.clone())
                    }
                    // Checked above: the token exists.
                    None => Extra::None,
                },
                Op::AppendLedger(r) if !r.identity_id.is_empty() => {
                    let id = r.identity_id.clone();
                    if !self.usage_touched.contains(&id) {
                        self.usage_touched.push(id.clone());
                    }
                    self.loaded.usage.entry(id).or_default().apply(r);
                    Extra::None
                }
                _ => Extra::None,
            };
            extras.push(extra);
        }
        extras
    }

    fn put_identity(&mut self, rec: &IdentityRecord) {
        self.loaded
            .spiffe_ids
            .insert(rec.spiffe_id.to_string(), rec.id.clone());
        self.loaded.revisions.insert(rec.id.clone(), rec.revision);
        self.loaded.identities.insert(rec.id.clone(), rec.clone());
    }
}

/// What an op's write needs beyond the op.
enum Extra {
    None,
    ReplacesSpiffeId(Option<String>),
    Consumed(JoinTokenRecord),
}

/// What one accepted change writes besides its ops: its chained audit entries.
struct Accepted {
    extras: Vec<Extra>,
    audit: Vec<(u64, String, Vec<u8>)>,
}

/// A batch that did not commit.
struct Failed {
    error: StoreError,
    /// The chain head the batch would have ended at, had it committed (`None`: it failed
    /// before writing, so it cannot have).
    end: Option<ChainHead>,
    /// The jobs whose changes it would have applied.
    accepted: Vec<usize>,
}

impl From<StoreError> for Failed {
    fn from(error: StoreError) -> Self {
        Failed {
            error,
            end: None,
            accepted: Vec::new(),
        }
    }
}

async fn apply_batch<B: Backend>(
    backend: &B,
    sealer: &Sealer,
    jobs: &mut [Job],
    follow: &mut Follow,
    observer: &Observer,
) -> Result<Vec<Result<Committed, Conflict>>, Failed> {
    let needs = needs_of(jobs);
    let mut txn = backend.begin().await?;
    let loaded = txn.load(&needs).await?;
    // On a shared store, what other writers committed before this batch reaches the observer
    // first: every replica's views change in the log's order.
    let log_seq = loaded.log_seq;
    if follow.shared && log_seq > follow.applied {
        follow.catch_up(backend, observer).await?;
    }
    let mut head: ChainHead = loaded.head.clone();
    let mut view = View {
        loaded,
        usage_touched: Vec::new(),
    };
    // Decide each change in order.
    let mut decided: Vec<Result<Accepted, Conflict>> = Vec::with_capacity(jobs.len());
    for job in jobs.iter_mut() {
        if let Err(c) = view.check(&job.change) {
            decided.push(Err(c));
            continue;
        }
        // The sequence its first audit entry gets: the change's place in commit order.
        let extras = view.apply(&mut job.change, head.seq + 1);
        // The drafts are not needed once chained (whatever the batch's fate, the change is
        // answered, never retried): move them instead of copying.
        let drafts = std::mem::take(&mut job.change.audit);
        let audit = drafts
            .into_iter()
            .map(|d| {
                let (entry, bytes) = head.append(sealer, d);
                (entry.seq, entry.hash, bytes)
            })
            .collect();
        decided.push(Ok(Accepted { extras, audit }));
    }
    // Write what was decided, in order.
    let mut writes: Vec<Write<'_>> = Vec::new();
    let mut results = Vec::with_capacity(jobs.len());
    for (job, d) in jobs.iter().zip(decided.iter_mut()) {
        let Ok(acc) = d else {
            if let Err(c) = d {
                results.push(Err(c.clone()));
            }
            continue;
        };
        for (op, extra) in job.change.ops.iter().zip(acc.extras.iter_mut()) {
            if let Some(w) = write_of(op, std::mem::replace(extra, Extra::None)) {
                writes.push(w);
            }
        }
        let mut seqs = Vec::with_capacity(acc.audit.len());
        for (seq, hash, bytes) in acc.audit.drain(..) {
            seqs.push(seq);
            writes.push(Write::AppendAudit { seq, hash, bytes });
        }
        results.push(Ok(Committed { audit_seqs: seqs }));
    }
    for id in &view.usage_touched {
        if let Some(u) = view.loaded.usage.remove(id) {
            writes.push(Write::PutUsage {
                identity_id: id.clone(),
                usage: u,
            });
        }
    }
    if head != view.loaded.head {
        writes.push(Write::PutAnchor(crate::audit::Anchor::new(sealer, &head)));
    }
    let logged: Vec<&Op> = if follow.shared {
        jobs.iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .flat_map(|(j, _)| j.change.ops.iter())
            .collect()
    } else {
        Vec::new()
    };
    let logs = !logged.is_empty();
    if logs {
        writes.push(Write::Log(logged));
    }
    let moved = head != view.loaded.head;
    let failed = |error| Failed {
        error,
        end: moved.then(|| head.clone()),
        accepted: decided
            .iter()
            .enumerate()
            .filter(|(_, d)| d.is_ok())
            .map(|(i, _)| i)
            .collect(),
    };
    if let Err(e) = txn.write(&writes).await {
        return Err(failed(e));
    }
    if let Err(e) = txn.commit().await {
        return Err(failed(e));
    }
    // The observer hears this batch next (the caller notifies it): the log stands here now.
    if follow.shared && observer_of(observer).is_some() && follow.applied == log_seq {
        follow.applied = log_seq + u64::from(logs);
    }
    Ok(results)
}

fn write_of(op: &Op, extra: Extra) -> Option<Write<'_>> {
    Some(match op {
        Op::CreateIdentity(record) => Write::PutIdentity {
            record,
            replaces_spiffe_id: None,
        },
        Op::UpdateIdentity { record, .. } => Write::PutIdentity {
            record,
            replaces_spiffe_id: match extra {
                Extra::ReplacesSpiffeId(s) => s,
                _ => None,
            },
        },
        Op::PutJoinToken(r) => Write::PutJoinToken(Cow::Borrowed(r)),
        Op::ConsumeJoinToken { .. } => match extra {
            Extra::Consumed(r) => Write::PutJoinToken(Cow::Owned(r)),
            _ => return None,
        },
        Op::AssertIdentityRevision { .. } => return None,
        Op::PutKey(r) => Write::PutKey(r),
        Op::AppendLedger(r) => Write::AppendLedger(r),
        Op::PutRevocation(r) => Write::PutRevocation(r),
        Op::PruneRevocations { expired_before } => Write::PruneRevocations {
            expired_before: *expired_before,
        },
        Op::PutOwner(r) => Write::PutOwner(r),
        Op::PutApproval(r) => Write::PutApproval(r),
        Op::PruneLedger {
            issued_before,
            limit,
        } => Write::PruneLedger {
            issued_before: *issued_before,
            limit: *limit,
        },
        Op::PruneAudit { checkpoint } => Write::PruneAudit(checkpoint),
    })
}

#[async_trait]
impl<B: Backend> Store for GroupCommit<B> {
    async fn commit(&self, change: Change) -> Result<Committed, StoreError> {
        let (reply, rx) = oneshot::channel();
        {
            let tx = self.tx.load();
            let tx = tx.as_ref().ok_or(StoreError::Closed)?;
            tx.try_send(Job { change, reply }).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    metrics::counter!("sigil_store_shed_total").increment(1);
                    StoreError::Overloaded(format!(
                        "{} changes are already waiting for the store",
                        tx.max_capacity()
                    ))
                }
                mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
            })?;
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn set_observer(&self, observer: Weak<dyn CommitObserver>) {
        if let Ok(mut o) = self.observer.write() {
            *o = Some(observer);
        }
    }

    fn health(&self) -> Result<(), String> {
        let failed = self
            .state
            .failure
            .lock()
            .map_err(|_| "store writer panicked".to_owned())?
            .clone();
        let feed = self
            .state
            .feed
            .lock()
            .map_err(|_| "store writer panicked".to_owned())?
            .clone();
        match failed.or(feed) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    fn is_leader(&self) -> bool {
        self.state.leader.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        if !self.backend.shared() {
            return Ok(());
        }
        // An empty change: its batch locks the head, applies everything logged before it to
        // the observer, and commits nothing.
        self.commit(Change::default()).await.map(|_| ())
    }

    fn fatal(&self) -> Option<String> {
        self.state.fatal.lock().ok().and_then(|f| f.clone())
    }

    async fn close(&self) {
        self.tx.store(None);
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            // The writer finishes what is queued, then exits (and shuts the backend down)
            // because no sender is left.
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

#[async_trait]
impl<B: Backend> StoreReads for GroupCommit<B> {
    async fn meta(&self) -> Result<StoreMeta, StoreError> {
        self.backend.meta().await
    }
    async fn identities(&self) -> Result<Vec<IdentityRecord>, StoreError> {
        self.backend.identities().await
    }
    async fn join_token(&self, hash: &str) -> Result<Option<JoinTokenRecord>, StoreError> {
        self.backend.join_token(hash).await
    }
    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.backend.keys().await
    }
    async fn ledger_record(
        &self,
        credential_id: &[u8],
    ) -> Result<Option<LedgerRecord>, StoreError> {
        self.backend.ledger_record(credential_id).await
    }
    async fn ledger_len(&self) -> Result<u64, StoreError> {
        self.backend.ledger_len().await
    }
    async fn ledger_since(
        &self,
        since: i64,
        identity_id: Option<String>,
    ) -> Result<Vec<LedgerRecord>, StoreError> {
        self.backend.ledger_since(since, identity_id).await
    }
    async fn revocations(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        self.backend.revocations().await
    }
    async fn usage(&self) -> Result<Vec<UsageRecord>, StoreError> {
        self.backend.usage().await
    }
    async fn owners(&self) -> Result<Vec<OwnerRecord>, StoreError> {
        self.backend.owners().await
    }
    async fn approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError> {
        self.backend.approvals().await
    }
    async fn ledger_count_before(
        &self,
        issued_before: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.backend.ledger_count_before(issued_before, limit).await
    }
    async fn join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        self.backend.join_tokens().await
    }
    async fn audit_head(&self) -> Result<u64, StoreError> {
        self.backend.audit_head().await
    }
    async fn audit_entries(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.backend.audit_entries(from_seq, limit).await
    }
    async fn audit_checkpoint(&self) -> Result<Option<crate::audit::Checkpoint>, StoreError> {
        self.backend.audit_checkpoint().await
    }
    async fn audit_anchor(&self) -> Result<Option<crate::audit::Anchor>, StoreError> {
        self.backend.audit_anchor().await
    }
    async fn export(
        &self,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<crate::dump::Summary, StoreError> {
        self.backend.export(out).await
    }
}
