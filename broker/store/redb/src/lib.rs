//! The embedded backend: one redb file in the data dir.
//!
//! redb is synchronous: the shared writer ([`sigil_store_core::GroupCommit`]) runs each batch's
//! transaction on its own thread, and reads run on tokio's blocking pool against MVCC snapshots,
//! never waiting for the writer. Ledger keys are credential ids that start with the issue time
//! and audit keys are sequence numbers, so inserts land at the right edge of their B-trees.
//!
//! A store is looked into before it is trusted: the master key is checked (the key-check file
//! beside the store, then the one inside it) through a view whose writes never reach the file
//! ([`check_master_key`]), so a wrong key changes nothing even when the file needs crash
//! recovery; the offline tools read through the same view ([`read_audit_file`]).

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use redb::backends::FileBackend;
use redb::{
    BackendError, Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    StorageBackend, TableDefinition, TableHandle as _, WriteTransaction,
};
use sigil_store_core::audit::ChainHead;
use sigil_store_core::backend::codec::{corrupt, encode as to_json, unavailable};
use sigil_store_core::backend::{Backend, Loaded, Needs, Txn, Write};
use sigil_store_core::model::{
    ApprovalRecord, IdentityRecord, JoinTokenRecord, KeyRecord, LedgerRecord, OwnerRecord,
    RevocationRecord, UsageRecord,
};
use sigil_store_core::seal::Sealer;
use sigil_store_core::{SCHEMA_VERSION, StoreError, StoreMeta, StoreReads};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const IDENTITIES: TableDefinition<&str, &[u8]> = TableDefinition::new("identities");
const SPIFFE_INDEX: TableDefinition<&str, &str> = TableDefinition::new("identities_by_spiffe_id");
const JOIN_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("join_tokens");
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const LEDGER: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ledger");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const IDENTITY_REVISIONS: TableDefinition<&str, u64> = TableDefinition::new("identity_revisions");
/// Per-identity usage derived from the ledger (an index maintained with every ledger insert).
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");
const OWNERS: TableDefinition<&str, &[u8]> = TableDefinition::new("owners");
const APPROVALS: TableDefinition<&str, &[u8]> = TableDefinition::new("approvals");
/// Keyed by expiry (big-endian seconds) then credential id, so pruning is a range delete.
const REVOCATIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("revocations");

const META_INFO: &str = "store_meta";
const META_KEY_CHECK: &str = "key_check";
const META_CHECKPOINT: &str = "audit_checkpoint";
const META_ANCHOR: &str = "audit_anchor";

pub use sigil_store_core::FaultSwitch;

/// The switch in front of every write of the file.
#[cfg(feature = "faults")]
fn check_faults(f: &FaultSwitch) -> std::io::Result<()> {
    if f.failing() {
        return Err(std::io::Error::other(
            "injected write failure (FaultSwitch)",
        ));
    }
    Ok(())
}

/// redb's file backend with a [`FaultSwitch`] in front of every write.
#[cfg(feature = "faults")]
#[derive(Debug)]
struct FaultyBackend {
    inner: FileBackend,
    faults: FaultSwitch,
}

#[cfg(feature = "faults")]
impl StorageBackend for FaultyBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        check_faults(&self.faults)?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        check_faults(&self.faults)?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        check_faults(&self.faults)?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }
}

/// A view of a store file in which redb may do whatever it must to open it (crash recovery
/// rewrites the allocator state and headers) while the file itself is never written: writes
/// land in memory pages over the file. Locks go to the real file, so a view cannot be opened
/// beside a broker that has the store open.
///
/// Used to look into a store before trusting the master key (a wrong key must change nothing)
/// and by the offline tools (`audit verify --offline`), which must work on exactly the store a
/// crash left behind.
#[derive(Debug)]
struct ScratchBackend {
    /// For locks only.
    locks: FileBackend,
    /// For reads.
    file: std::fs::File,
    file_len: u64,
    state: std::sync::Mutex<Scratch>,
}

#[derive(Debug)]
struct Scratch {
    len: u64,
    pages: HashMap<u64, Box<[u8]>>,
}

const SCRATCH_PAGE: u64 = 4096;

impl ScratchBackend {
    fn open(path: &Path) -> Result<Self, StoreError> {
        let file = std::fs::File::open(path).map_err(|e| open_io(path, e))?;
        // Locks need a writable descriptor; the file is never written through it. A file we
        // may not write to cannot be a live broker's either (it needs write access), so a
        // read-only descriptor without locks is enough then.
        let lock_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .or_else(|_| std::fs::File::open(path))
            .map_err(|e| open_io(path, e))?;
        let file_len = file.metadata().map_err(|e| open_io(path, e))?.len();
        Ok(ScratchBackend {
            locks: FileBackend::new(lock_file).map_err(|e| open_error(path, e))?,
            file,
            file_len,
            state: std::sync::Mutex::new(Scratch {
                len: file_len,
                pages: HashMap::new(),
            }),
        })
    }

    /// The page `n` as the view sees it.
    fn page(&self, pages: &HashMap<u64, Box<[u8]>>, n: u64) -> std::io::Result<Box<[u8]>> {
        use std::os::unix::fs::FileExt as _;
        if let Some(p) = pages.get(&n) {
            return Ok(p.clone());
        }
        let mut buf = vec![0u8; SCRATCH_PAGE as usize].into_boxed_slice();
        let start = n * SCRATCH_PAGE;
        if start < self.file_len {
            let have = ((self.file_len - start).min(SCRATCH_PAGE)) as usize;
            self.file.read_exact_at(&mut buf[..have], start)?;
        }
        Ok(buf)
    }
}

impl StorageBackend for ScratchBackend {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .len)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let st = self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let mut done = 0usize;
        while done < out.len() {
            let pos = offset + done as u64;
            let (n, within) = (pos / SCRATCH_PAGE, (pos % SCRATCH_PAGE) as usize);
            let take = (SCRATCH_PAGE as usize - within).min(out.len() - done);
            if !st.pages.contains_key(&n) && pos + take as u64 <= self.file_len {
                use std::os::unix::fs::FileExt as _;
                self.file.read_exact_at(&mut out[done..done + take], pos)?;
            } else {
                let page = self.page(&st.pages, n)?;
                out[done..done + take].copy_from_slice(&page[within..within + take]);
            }
            done += take;
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        st.len = len;
        // Bytes cut off and grown back read as zeros, as with a real file.
        let first_gone = len.div_ceil(SCRATCH_PAGE);
        st.pages.retain(|n, _| *n < first_gone);
        if !len.is_multiple_of(SCRATCH_PAGE)
            && let Some(p) = st.pages.get_mut(&(len / SCRATCH_PAGE))
        {
            p[(len % SCRATCH_PAGE) as usize..].fill(0);
        }
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let (n, within) = (pos / SCRATCH_PAGE, (pos % SCRATCH_PAGE) as usize);
            let take = (SCRATCH_PAGE as usize - within).min(data.len() - done);
            let mut page = self.page(&st.pages, n)?;
            page[within..within + take].copy_from_slice(&data[done..done + take]);
            st.pages.insert(n, page);
            done += take;
        }
        st.len = st.len.max(offset + data.len() as u64);
        Ok(())
    }
    fn close(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.locks.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.locks.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.locks.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.locks.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.locks.unlock_range(start, end)
    }
}

/// Opens `path` as a database whose writes never reach the file (see [`ScratchBackend`]).
fn open_view(path: &Path) -> Result<Database, StoreError> {
    open_view_noting_repair(path).map(|(db, _)| db)
}

/// [`open_view`], and whether redb had to repair the file to open it (it was not closed
/// cleanly: a crash, a kill, a full disk).
fn open_view_noting_repair(path: &Path) -> Result<(Database, bool), StoreError> {
    let backend = ScratchBackend::open(path)?;
    let repaired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = repaired.clone();
    let db = Database::builder()
        .set_repair_callback(move |_| flag.store(true, std::sync::atomic::Ordering::Relaxed))
        .create_with_backend(backend)
        .map_err(|e| open_error(path, e))?;
    Ok((db, repaired.load(std::sync::atomic::Ordering::Relaxed)))
}

/// Name of the threads that look into a store file (see [`guarded`]).
const CHECK_THREAD: &str = "sigil-store-check";

/// Runs `f` — which reads a store file that may be damaged — on a thread of its own, so that a
/// panic inside redb on a damaged file becomes an error naming the file, not a crash (and is
/// not printed as one).
fn guarded<T: Send>(
    path: &Path,
    f: impl FnOnce() -> Result<T, StoreError> + Send,
) -> Result<T, StoreError> {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(CHECK_THREAD) {
                tracing::debug!(panic = %info, "redb panicked reading a damaged store file");
            } else {
                previous(info);
            }
        }));
    });
    std::thread::scope(|scope| {
        let joined = std::thread::Builder::new()
            .name(CHECK_THREAD.into())
            .spawn_scoped(scope, f)
            .map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))?
            .join();
        match joined {
            Ok(r) => r,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                Err(StoreError::Corrupt(format!(
                    "{} is damaged: redb could not read it ({what}); nothing was written to it. Restore it from a backup (`sigil restore`)",
                    path.display()
                )))
            }
        }
    })
}

/// What looking into a store file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inspection {
    /// It was not closed cleanly (a crash): opening it will run redb's crash recovery.
    pub unclean: bool,
}

/// Checks the store file at `path` without writing to it: redb's integrity check (every page
/// checksum) always, and when the file was not closed cleanly, also that every record decodes.
/// A damaged file is an error saying what is wrong (and, for a record, which table and key);
/// redb panicking on a damaged file is such an error too, not a crash.
pub fn check_file(path: &Path) -> Result<Inspection, StoreError> {
    guarded(path, || {
        let (mut db, unclean) = open_view_noting_repair(path)?;
        integrity(path, &mut db)?;
        if unclean {
            decode_all(&db)?;
        }
        Ok(Inspection { unclean })
    })
}

fn integrity(path: &Path, db: &mut Database) -> Result<(), StoreError> {
    match db.check_integrity() {
        Ok(true) => Ok(()),
        Ok(false) => Err(StoreError::Corrupt(format!(
            "{} failed redb's integrity check: pages whose checksums do not match were found (the file was changed outside sigil, or the disk returned bad data); nothing was written to it. Restore it from a backup (`sigil restore`)",
            path.display()
        ))),
        Err(e) => Err(StoreError::Corrupt(format!(
            "{} failed redb's integrity check: {e}; nothing was written to it. Restore it from a backup (`sigil restore`)",
            path.display()
        ))),
    }
}

/// Decodes every record of every table; the first that does not names its table and key.
fn decode_all(db: &Database) -> Result<(), StoreError> {
    fn strs<T: serde::de::DeserializeOwned>(
        r: &redb::ReadTransaction,
        t: TableDefinition<&str, &[u8]>,
    ) -> Result<(), StoreError> {
        let table = r.open_table(t).map_err(|e| corrupt(t.name(), e))?;
        for item in table.iter().map_err(|e| corrupt(t.name(), e))? {
            let (k, v) = item.map_err(|e| corrupt(t.name(), e))?;
            serde_json::from_slice::<T>(v.value())
                .map_err(|e| corrupt(&format!("{}[{}]", t.name(), k.value()), e))?;
        }
        Ok(())
    }
    fn bytes<T: serde::de::DeserializeOwned>(
        r: &redb::ReadTransaction,
        t: TableDefinition<&[u8], &[u8]>,
    ) -> Result<(), StoreError> {
        let table = r.open_table(t).map_err(|e| corrupt(t.name(), e))?;
        for item in table.iter().map_err(|e| corrupt(t.name(), e))? {
            let (k, v) = item.map_err(|e| corrupt(t.name(), e))?;
            serde_json::from_slice::<T>(v.value()).map_err(|e| {
                corrupt(
                    &format!(
                        "{}[{}]",
                        t.name(),
                        k.value()
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<String>()
                    ),
                    e,
                )
            })?;
        }
        Ok(())
    }
    let r = db.begin_read().map_err(|e| corrupt("file", e))?;
    strs::<IdentityRecord>(&r, IDENTITIES)?;
    strs::<JoinTokenRecord>(&r, JOIN_TOKENS)?;
    strs::<KeyRecord>(&r, KEYS)?;
    strs::<UsageRecord>(&r, USAGE)?;
    strs::<OwnerRecord>(&r, OWNERS)?;
    strs::<ApprovalRecord>(&r, APPROVALS)?;
    bytes::<LedgerRecord>(&r, LEDGER)?;
    bytes::<RevocationRecord>(&r, REVOCATIONS)?;
    let audit = r.open_table(AUDIT).map_err(|e| corrupt("audit", e))?;
    for item in audit.iter().map_err(|e| corrupt("audit", e))? {
        let (k, v) = item.map_err(|e| corrupt("audit", e))?;
        serde_json::from_slice::<sigil_store_core::audit::AuditEntry>(v.value())
            .map_err(|e| corrupt(&format!("audit[{}]", k.value()), e))?;
    }
    let spiffe = r
        .open_table(SPIFFE_INDEX)
        .map_err(|e| corrupt("identities_by_spiffe_id", e))?;
    for item in spiffe
        .iter()
        .map_err(|e| corrupt("identities_by_spiffe_id", e))?
    {
        item.map_err(|e| corrupt("identities_by_spiffe_id", e))?;
    }
    let revisions = r
        .open_table(IDENTITY_REVISIONS)
        .map_err(|e| corrupt("identity_revisions", e))?;
    for item in revisions
        .iter()
        .map_err(|e| corrupt("identity_revisions", e))?
    {
        item.map_err(|e| corrupt("identity_revisions", e))?;
    }
    Ok(())
}

fn open_io(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Open(format!("{}: {e}", path.display()))
}

/// The redb backend.
pub struct RedbBackend {
    /// `None` once shut down (so the file is released even while others still hold the store),
    /// and while it is reopened after a failed write.
    db: ArcSwapOption<Database>,
    path: PathBuf,
    /// The audit chain after the last committed entry (this process is the only writer).
    head: std::sync::Mutex<ChainHead>,
    closed: std::sync::atomic::AtomicBool,
    /// Where writes go through, when built with write-failure injection.
    faults: Faults,
}

impl std::fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Write-failure injection, when built with it.
#[derive(Clone, Default)]
struct Faults(#[cfg(feature = "faults")] Option<FaultSwitch>);

/// Opens the real file (through the fault switch, if any). A panic inside redb is an error.
fn open_db(path: &Path, faults: &Faults) -> Result<Database, StoreError> {
    #[cfg(feature = "faults")]
    if let Some(switch) = faults.0.clone() {
        return guarded(path, || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| open_io(path, e))?;
            let inner = FileBackend::new(file).map_err(|e| open_error(path, e))?;
            Database::builder()
                .create_with_backend(FaultyBackend {
                    inner,
                    faults: switch,
                })
                .map_err(|e| open_error(path, e))
        });
    }
    let _ = faults;
    guarded(path, || {
        Database::builder()
            .open(path)
            .map_err(|e| open_error(path, e))
    })
}

/// Upgrades a store made before the audit chain's end was anchored: anchors its end as it is
/// now, and marks it anchored (a key check only the master key can make), in one durable
/// transaction, so from now on a missing anchor means it was removed.
fn anchor_first_time(
    path: &Path,
    db: &Database,
    sealer: &Sealer,
    head: &ChainHead,
) -> Result<(), StoreError> {
    let check = sealer.key_check();
    let mut w = db.begin_write().map_err(unavailable)?;
    w.set_durability(Durability::Immediate)
        .map_err(unavailable)?;
    {
        let mut m = w.open_table(META).map_err(unavailable)?;
        if head.seq > 0 {
            let anchor = sigil_store_core::audit::Anchor::new(sealer, head);
            m.insert(META_ANCHOR, to_json(&anchor).as_slice())
                .map_err(unavailable)?;
        }
        m.insert(META_KEY_CHECK, check.as_slice())
            .map_err(unavailable)?;
    }
    w.commit().map_err(unavailable)?;
    write_durable(&key_check_path(path), &check)
        .map_err(|e| StoreError::Open(format!("{}: {e}", key_check_path(path).display())))?;
    tracing::info!(path = %path.display(), audit_head = head.seq, "the audit chain's end is anchored from now on (store made by an earlier release)");
    Ok(())
}

/// The audit chain's head as stored.
fn read_head(db: &Database) -> Result<ChainHead, StoreError> {
    let r = db.begin_read().map_err(opening)?;
    let a = r.open_table(AUDIT).map_err(|e| corrupt("audit table", e))?;
    Ok(match a.last().map_err(opening)? {
        Some((k, v)) => {
            let e: sigil_store_core::audit::AuditEntry = serde_json::from_slice(v.value())
                .map_err(|e| corrupt(&format!("audit[{}]", k.value()), e))?;
            ChainHead {
                seq: k.value(),
                hash: e.hash,
            }
        }
        None => ChainHead::default(),
    })
}

fn opening(e: impl std::fmt::Display) -> StoreError {
    StoreError::Open(e.to_string())
}

/// Writes `bytes` to `path` durably: a temporary file, fsync, rename, fsync of the directory.
fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = {
        let mut t = path.as_os_str().to_owned();
        t.push(".tmp");
        PathBuf::from(t)
    };
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Makes the directory entry of `path` durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => std::fs::File::open(d)?.sync_all(),
        _ => std::fs::File::open(".")?.sync_all(),
    }
}

/// The sealed key check kept beside the database file, checked before redb opens the file so a
/// wrong key changes nothing on disk even when the file needs crash recovery.
pub fn key_check_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".keycheck");
    PathBuf::from(p)
}

/// Checks that `path` is a store this build reads and that `sealer`'s master key is the one
/// it was created with — the key check beside the file first, then the one inside it — without
/// writing a byte of either, even when the file needs crash recovery. Every path that opens a
/// store (serve, dev, the offline tools) runs this first.
pub fn check_master_key(path: &Path, sealer: &Sealer) -> Result<(), StoreError> {
    let sidecar = key_check_path(path);
    match std::fs::read(&sidecar) {
        Ok(check) if check.is_empty() => {
            return Err(StoreError::Incompatible(format!(
                "the key-check file {} is empty (torn by a crash right after `sigil init`?); it is not evidence of a wrong key. Delete it to check the key against the store itself",
                sidecar.display()
            )));
        }
        Ok(check) => {
            if !sealer.opens_key_check(&check) {
                // A truncated file cannot authenticate whatever the key: say so, not "wrong key".
                if check.len() < sigil_store_core::seal::KEY_CHECK_LEN {
                    return Err(StoreError::Incompatible(format!(
                        "the key-check file {} is truncated ({} bytes); it is not evidence of a wrong key. Delete it to check the key against the store itself",
                        sidecar.display(),
                        check.len()
                    )));
                }
                return Err(wrong_key(path));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(unavailable(e)),
    }
    guarded(path, || {
        let db = open_view(path)?;
        let (meta, check) = read_meta(&db)?;
        check_schema(path, &meta)?;
        if !sealer.opens_key_check(&check) {
            return Err(wrong_key(path));
        }
        Ok(())
    })
}

/// The store's facts and its sealed key check.
fn read_meta(db: &Database) -> Result<(StoreMeta, Vec<u8>), StoreError> {
    let r = db.begin_read().map_err(opening)?;
    let m = r.open_table(META).map_err(|e| corrupt("meta table", e))?;
    let info = m
        .get(META_INFO)
        .map_err(opening)?
        .map(|g| g.value().to_vec())
        .ok_or_else(|| corrupt("meta", "store_meta is missing"))?;
    let check = m
        .get(META_KEY_CHECK)
        .map_err(opening)?
        .map(|g| g.value().to_vec())
        .ok_or_else(|| corrupt("meta", "key_check is missing"))?;
    let meta = serde_json::from_slice(&info).map_err(|e| corrupt("store_meta", e))?;
    Ok((meta, check))
}

fn check_schema(path: &Path, meta: &StoreMeta) -> Result<(), StoreError> {
    if meta.schema_version != SCHEMA_VERSION {
        return Err(StoreError::Incompatible(format!(
            "{} has schema version {}; this build of sigil reads version {SCHEMA_VERSION}",
            path.display(),
            meta.schema_version
        )));
    }
    Ok(())
}

fn wrong_key(path: &Path) -> StoreError {
    StoreError::Incompatible(format!(
        "the master key does not match the data in {} (wrong SIGIL_MASTER_KEY or master key file?); nothing was changed",
        path.display()
    ))
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Incompatible(format!(
            "{} is already open by another process (is another `sigil serve` running on this data dir?)",
            path.display()
        )),
        other => StoreError::Open(format!("{}: {other}", path.display())),
    }
}

impl RedbBackend {
    /// Creates a new store file. Refuses if `path` exists.
    pub fn create(path: &Path, sealer: &Sealer, meta: StoreMeta) -> Result<Self, StoreError> {
        if path.exists() {
            return Err(StoreError::Incompatible(format!(
                "{} already exists",
                path.display()
            )));
        }
        let check = sealer.key_check();
        // Durable before anything refers to it: a crash right after `init` must not leave an
        // empty key check that reads as a wrong key.
        write_durable(&key_check_path(path), &check)
            .map_err(|e| StoreError::Open(format!("{}: {e}", key_check_path(path).display())))?;
        let db = Database::builder()
            .create(path)
            .map_err(|e| open_error(path, e))?;
        let mut txn = db.begin_write().map_err(unavailable)?;
        txn.set_durability(Durability::Immediate)
            .map_err(unavailable)?;
        {
            let mut m = txn.open_table(META).map_err(unavailable)?;
            m.insert(META_INFO, to_json(&meta).as_slice())
                .map_err(unavailable)?;
            m.insert(META_KEY_CHECK, check.as_slice())
                .map_err(unavailable)?;
            // Create every table so readers never meet a missing one.
            txn.open_table(IDENTITIES).map_err(unavailable)?;
            txn.open_table(SPIFFE_INDEX).map_err(unavailable)?;
            txn.open_table(JOIN_TOKENS).map_err(unavailable)?;
            txn.open_table(KEYS).map_err(unavailable)?;
            txn.open_table(LEDGER).map_err(unavailable)?;
            txn.open_table(AUDIT).map_err(unavailable)?;
            txn.open_table(IDENTITY_REVISIONS).map_err(unavailable)?;
            txn.open_table(REVOCATIONS).map_err(unavailable)?;
            txn.open_table(USAGE).map_err(unavailable)?;
            txn.open_table(OWNERS).map_err(unavailable)?;
            txn.open_table(APPROVALS).map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;
        sync_dir(path).map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))?;
        Ok(Self::start(
            db,
            path,
            ChainHead::default(),
            Faults::default(),
        ))
    }

    /// Opens an existing store, checking the schema version and that `sealer`'s master key is
    /// the one the store was created with. On any refusal the file is left as it was.
    pub fn open(path: &Path, sealer: &Sealer) -> Result<Self, StoreError> {
        Self::open_inner(path, sealer, Faults::default())
    }

    /// [`RedbBackend::open`], with writes going through `faults` when given.
    #[cfg(feature = "faults")]
    pub fn open_with_faults(
        path: &Path,
        sealer: &Sealer,
        faults: Option<FaultSwitch>,
    ) -> Result<Self, StoreError> {
        Self::open_inner(path, sealer, Faults(faults))
    }

    fn open_inner(path: &Path, sealer: &Sealer, faults: Faults) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Incompatible(format!(
                "{} does not exist (run `sigil init` first)",
                path.display()
            )));
        }
        check_master_key(path, sealer)?;
        // Before the file is opened for writing (which runs crash recovery on it): a damaged
        // file is refused unchanged.
        let inspection = check_file(path)?;
        if inspection.unclean {
            tracing::warn!(path = %path.display(), "the store was not closed cleanly; its integrity was checked in full and redb's crash recovery runs now");
        }
        let db = open_db(path, &faults)?;
        // Checked again on the open database: the file may have changed since.
        let (meta, check) = read_meta(&db)?;
        check_schema(path, &meta)?;
        if !sealer.opens_key_check(&check) {
            return Err(wrong_key(path));
        }
        let head = read_head(&db)?;
        if !sealer.key_check_anchored(&check) {
            anchor_first_time(path, &db, sealer, &head)?;
        }
        Ok(Self::start(db, path, head, faults))
    }

    fn start(db: Database, path: &Path, head: ChainHead, faults: Faults) -> Self {
        RedbBackend {
            db: ArcSwapOption::new(Some(Arc::new(db))),
            path: path.to_owned(),
            head: std::sync::Mutex::new(head),
            closed: std::sync::atomic::AtomicBool::new(false),
            faults,
        }
    }

    /// Every record of a string-keyed JSON table.
    async fn scan<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        what: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        self.read(move |db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(table).map_err(unavailable)?;
            let mut out = Vec::new();
            for item in t.iter().map_err(unavailable)? {
                let (_, v) = item.map_err(unavailable)?;
                out.push(serde_json::from_slice(v.value()).map_err(|e| corrupt(what, e))?);
            }
            Ok(out)
        })
        .await
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.handle()?;
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| unavailable(format!("read task: {e}")))?
    }
}

impl RedbBackend {
    /// The open database, or why there is none.
    fn handle(&self) -> Result<Arc<Database>, StoreError> {
        match self.db.load_full() {
            Some(db) => Ok(db),
            None if self.closed.load(std::sync::atomic::Ordering::SeqCst) => {
                Err(StoreError::Closed)
            }
            None => Err(StoreError::Unavailable(
                "the store is being reopened after a failed write".into(),
            )),
        }
    }
}

/// One batch's write transaction.
struct RedbTxn<'a> {
    txn: WriteTransaction,
    backend: &'a RedbBackend,
    /// The chain head the batch ends at.
    head: Option<ChainHead>,
}

#[async_trait(?Send)]
impl Backend for RedbBackend {
    async fn begin(&self) -> Result<Box<dyn Txn + '_>, StoreError> {
        let db = self.handle()?;
        let mut txn = db.begin_write().map_err(unavailable)?;
        txn.set_durability(Durability::Immediate)
            .map_err(unavailable)?;
        Ok(Box::new(RedbTxn {
            txn,
            backend: self,
            head: None,
        }))
    }

    fn shut_down(&self) {
        // Release the file now, whoever still holds this backend.
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.db.store(None);
    }

    async fn recover(&self) -> Result<ChainHead, StoreError> {
        // redb refuses everything after a failed write until the file is reopened. Readers
        // that hold the old handle finish first (their reads are short): the file lock is
        // released only when the last one lets go.
        if let Some(mut old) = self.db.swap(None) {
            let started = std::time::Instant::now();
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still) if started.elapsed() < std::time::Duration::from_secs(5) => {
                        old = still;
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    Err(still) => {
                        self.db.store(Some(still));
                        return Err(StoreError::Unavailable(
                            "reads still hold the failed store open".into(),
                        ));
                    }
                }
            }
        }
        // Reopening runs redb's crash recovery, which writes: it fails while the disk is full
        // and succeeds once there is room again.
        let db = open_db(&self.path, &self.faults).map_err(|e| match e {
            StoreError::Open(r) => StoreError::Unavailable(format!("reopening: {r}")),
            other => other,
        })?;
        let head = read_head(&db).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        // Prove a durable commit works before saying the store is back.
        let mut probe = db.begin_write().map_err(unavailable)?;
        probe
            .set_durability(Durability::Immediate)
            .map_err(unavailable)?;
        probe.commit().map_err(unavailable)?;
        if let Ok(mut h) = self.head.lock() {
            *h = head.clone();
        }
        self.db.store(Some(Arc::new(db)));
        Ok(head)
    }
}

#[async_trait(?Send)]
impl Txn for RedbTxn<'_> {
    async fn load(&mut self, needs: &Needs) -> Result<Loaded, StoreError> {
        let mut out = Loaded {
            head: self
                .backend
                .head
                .lock()
                .map_err(|_| unavailable("chain head lock poisoned"))?
                .clone(),
            ..Loaded::default()
        };
        if !needs.identities.is_empty() {
            let t = self.txn.open_table(IDENTITIES).map_err(unavailable)?;
            for id in &needs.identities {
                if let Some(v) = t.get(id.as_str()).map_err(unavailable)? {
                    let rec: IdentityRecord = serde_json::from_slice(v.value())
                        .map_err(|e| corrupt(&format!("identities/{id}"), e))?;
                    out.identities.insert(id.clone(), rec);
                }
            }
        }
        if !needs.revisions.is_empty() {
            let t = self
                .txn
                .open_table(IDENTITY_REVISIONS)
                .map_err(unavailable)?;
            for id in &needs.revisions {
                if let Some(v) = t.get(id.as_str()).map_err(unavailable)? {
                    out.revisions.insert(id.clone(), v.value());
                }
            }
        }
        if !needs.spiffe_ids.is_empty() {
            let t = self.txn.open_table(SPIFFE_INDEX).map_err(unavailable)?;
            for s in &needs.spiffe_ids {
                if let Some(v) = t.get(s.as_str()).map_err(unavailable)? {
                    out.spiffe_ids.insert(s.clone(), v.value().to_owned());
                }
            }
        }
        if !needs.join_tokens.is_empty() {
            let t = self.txn.open_table(JOIN_TOKENS).map_err(unavailable)?;
            for h in &needs.join_tokens {
                if let Some(v) = t.get(h.as_str()).map_err(unavailable)? {
                    let rec: JoinTokenRecord = serde_json::from_slice(v.value())
                        .map_err(|e| corrupt(&format!("join_tokens/{h}"), e))?;
                    out.join_tokens.insert(h.clone(), rec);
                }
            }
        }
        if !needs.audit.is_empty() {
            let t = self.txn.open_table(AUDIT).map_err(unavailable)?;
            for seq in &needs.audit {
                if let Some(v) = t.get(*seq).map_err(unavailable)? {
                    let e: sigil_store_core::audit::AuditEntry = serde_json::from_slice(v.value())
                        .map_err(|e| corrupt(&format!("audit/{seq}"), e))?;
                    out.audit_hashes.insert(*seq, e.hash);
                }
            }
        }
        if !needs.usage.is_empty() {
            let t = self.txn.open_table(USAGE).map_err(unavailable)?;
            for id in &needs.usage {
                if let Some(v) = t.get(id.as_str()).map_err(unavailable)? {
                    let rec: UsageRecord = serde_json::from_slice(v.value())
                        .map_err(|e| corrupt(&format!("usage/{id}"), e))?;
                    out.usage.insert(id.clone(), rec);
                }
            }
        }
        Ok(out)
    }

    async fn write(&mut self, writes: &[Write<'_>]) -> Result<(), StoreError> {
        let txn = &self.txn;
        let mut identities = txn.open_table(IDENTITIES).map_err(unavailable)?;
        let mut spiffe = txn.open_table(SPIFFE_INDEX).map_err(unavailable)?;
        let mut revisions = txn.open_table(IDENTITY_REVISIONS).map_err(unavailable)?;
        let mut tokens = txn.open_table(JOIN_TOKENS).map_err(unavailable)?;
        let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
        let mut ledger = txn.open_table(LEDGER).map_err(unavailable)?;
        let mut audit = txn.open_table(AUDIT).map_err(unavailable)?;
        let mut revocations = txn.open_table(REVOCATIONS).map_err(unavailable)?;
        let mut usage = txn.open_table(USAGE).map_err(unavailable)?;
        let mut owners = txn.open_table(OWNERS).map_err(unavailable)?;
        let mut approvals = txn.open_table(APPROVALS).map_err(unavailable)?;
        for w in writes {
            match w {
                Write::PutIdentity {
                    record,
                    replaces_spiffe_id,
                } => {
                    identities
                        .insert(record.id.as_str(), to_json(record).as_slice())
                        .map_err(unavailable)?;
                    revisions
                        .insert(record.id.as_str(), record.revision)
                        .map_err(unavailable)?;
                    if let Some(old) = replaces_spiffe_id {
                        spiffe.remove(old.as_str()).map_err(unavailable)?;
                    }
                    spiffe
                        .insert(record.spiffe_id.as_str(), record.id.as_str())
                        .map_err(unavailable)?;
                }
                Write::PutJoinToken(rec) => {
                    tokens
                        .insert(rec.hash.as_str(), to_json(rec.as_ref()).as_slice())
                        .map_err(unavailable)?;
                }
                Write::PutKey(rec) => {
                    keys.insert(rec.id.as_str(), to_json(rec).as_slice())
                        .map_err(unavailable)?;
                }
                Write::AppendLedger(rec) => {
                    let key = ledger_key(rec)?;
                    ledger
                        .insert(key.as_slice(), to_json(rec).as_slice())
                        .map_err(unavailable)?;
                }
                Write::PutRevocation(rec) => {
                    let key = revocation_key(rec)?;
                    revocations
                        .insert(key.as_slice(), to_json(rec).as_slice())
                        .map_err(unavailable)?;
                }
                Write::PruneRevocations { expired_before } => {
                    let end = (*expired_before).max(0).to_be_bytes();
                    let doomed: Vec<Vec<u8>> = revocations
                        .range::<&[u8]>(..end.as_slice())
                        .map_err(unavailable)?
                        .map(|item| item.map(|(k, _)| k.value().to_vec()))
                        .collect::<Result<_, _>>()
                        .map_err(unavailable)?;
                    for k in doomed {
                        revocations.remove(k.as_slice()).map_err(unavailable)?;
                    }
                }
                Write::PruneLedger {
                    issued_before,
                    limit,
                } => {
                    // Ledger keys start with the issue time in big-endian nanoseconds.
                    let end = ((*issued_before).max(0) as u64)
                        .saturating_mul(1_000_000_000)
                        .to_be_bytes();
                    let doomed: Vec<Vec<u8>> = ledger
                        .range::<&[u8]>(..end.as_slice())
                        .map_err(unavailable)?
                        .take(*limit)
                        .map(|item| item.map(|(k, _)| k.value().to_vec()))
                        .collect::<Result<_, _>>()
                        .map_err(unavailable)?;
                    for k in doomed {
                        ledger.remove(k.as_slice()).map_err(unavailable)?;
                    }
                }
                Write::PutOwner(rec) => {
                    owners
                        .insert(rec.name.as_str(), to_json(rec).as_slice())
                        .map_err(unavailable)?;
                }
                Write::PutApproval(rec) => {
                    approvals
                        .insert(rec.id.as_str(), to_json(rec).as_slice())
                        .map_err(unavailable)?;
                }
                Write::PutUsage {
                    identity_id,
                    usage: u,
                } => {
                    usage
                        .insert(identity_id.as_str(), to_json(u).as_slice())
                        .map_err(unavailable)?;
                }
                Write::PruneAudit(c) => {
                    let doomed: Vec<u64> = audit
                        .range(..=c.seq)
                        .map_err(unavailable)?
                        .map(|item| item.map(|(k, _)| k.value()))
                        .collect::<Result<_, _>>()
                        .map_err(unavailable)?;
                    for k in doomed {
                        audit.remove(k).map_err(unavailable)?;
                    }
                    txn.open_table(META)
                        .map_err(unavailable)?
                        .insert(META_CHECKPOINT, to_json(c).as_slice())
                        .map_err(unavailable)?;
                }
                Write::PutAnchor(a) => {
                    txn.open_table(META)
                        .map_err(unavailable)?
                        .insert(META_ANCHOR, to_json(a).as_slice())
                        .map_err(unavailable)?;
                }
                Write::AppendAudit { seq, hash, bytes } => {
                    audit.insert(*seq, bytes.as_slice()).map_err(unavailable)?;
                    self.head = Some(ChainHead {
                        seq: *seq,
                        hash: hash.clone(),
                    });
                }
                // One writer: no other replica reads a log.
                Write::Log(_) => {}
                _ => {
                    return Err(StoreError::Unavailable(
                        "a write this backend does not know".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let RedbTxn { txn, backend, head } = *self;
        txn.commit().map_err(unavailable)?;
        if let Some(h) = head
            && let Ok(mut cached) = backend.head.lock()
        {
            *cached = h;
        }
        Ok(())
    }
}

fn ledger_key(rec: &LedgerRecord) -> Result<Vec<u8>, StoreError> {
    sigil_store_core::model::credential_key(rec.kind, &rec.credential_id).ok_or_else(|| {
        StoreError::Unavailable(format!(
            "ledger record has a malformed credential id {:?}",
            rec.credential_id
        ))
    })
}

fn revocation_key(rec: &RevocationRecord) -> Result<Vec<u8>, StoreError> {
    let id =
        sigil_store_core::model::credential_key(rec.kind, &rec.credential_id).ok_or_else(|| {
            StoreError::Unavailable(format!(
                "revocation has a malformed credential id {:?}",
                rec.credential_id
            ))
        })?;
    let mut key = rec.expires_at.max(0).to_be_bytes().to_vec();
    key.extend_from_slice(&id);
    Ok(key)
}

#[async_trait]
impl StoreReads for RedbBackend {
    async fn meta(&self) -> Result<StoreMeta, StoreError> {
        self.read(|db| {
            let r = db.begin_read().map_err(unavailable)?;
            let m = r.open_table(META).map_err(unavailable)?;
            let v = m
                .get(META_INFO)
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("meta", "missing"))?;
            serde_json::from_slice(v.value()).map_err(|e| corrupt("store_meta", e))
        })
        .await
    }

    async fn identities(&self) -> Result<Vec<IdentityRecord>, StoreError> {
        self.read(|db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(IDENTITIES).map_err(unavailable)?;
            let mut out = Vec::new();
            for item in t.iter().map_err(unavailable)? {
                let (_, v) = item.map_err(unavailable)?;
                out.push(serde_json::from_slice(v.value()).map_err(|e| corrupt("identity", e))?);
            }
            Ok(out)
        })
        .await
    }

    async fn join_token(&self, hash: &str) -> Result<Option<JoinTokenRecord>, StoreError> {
        let hash = hash.to_owned();
        self.read(move |db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(JOIN_TOKENS).map_err(unavailable)?;
            match t.get(hash.as_str()).map_err(unavailable)? {
                Some(v) => Ok(Some(
                    serde_json::from_slice(v.value()).map_err(|e| corrupt("join token", e))?,
                )),
                None => Ok(None),
            }
        })
        .await
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.read(|db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(KEYS).map_err(unavailable)?;
            let mut out = Vec::new();
            for item in t.iter().map_err(unavailable)? {
                let (_, v) = item.map_err(unavailable)?;
                out.push(serde_json::from_slice(v.value()).map_err(|e| corrupt("key", e))?);
            }
            Ok(out)
        })
        .await
    }

    async fn ledger_record(
        &self,
        credential_id: &[u8],
    ) -> Result<Option<LedgerRecord>, StoreError> {
        let id = credential_id.to_vec();
        self.read(move |db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(LEDGER).map_err(unavailable)?;
            match t.get(id.as_slice()).map_err(unavailable)? {
                Some(v) => Ok(Some(
                    serde_json::from_slice(v.value()).map_err(|e| corrupt("ledger record", e))?,
                )),
                None => Ok(None),
            }
        })
        .await
    }

    async fn ledger_count_before(
        &self,
        issued_before: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.read(move |db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(LEDGER).map_err(unavailable)?;
            let end = (issued_before.max(0) as u64)
                .saturating_mul(1_000_000_000)
                .to_be_bytes();
            Ok(t.range::<&[u8]>(..end.as_slice())
                .map_err(unavailable)?
                .take(limit)
                .count())
        })
        .await
    }

    async fn ledger_len(&self) -> Result<u64, StoreError> {
        self.read(|db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(LEDGER).map_err(unavailable)?;
            t.len().map_err(unavailable)
        })
        .await
    }

    async fn audit_entries(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.read(move |db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(AUDIT).map_err(unavailable)?;
            let mut out = Vec::new();
            for item in t.range(from_seq..).map_err(unavailable)?.take(limit) {
                let (k, v) = item.map_err(unavailable)?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn usage(&self) -> Result<Vec<UsageRecord>, StoreError> {
        self.scan(USAGE, "usage").await
    }

    async fn owners(&self) -> Result<Vec<OwnerRecord>, StoreError> {
        self.scan(OWNERS, "owner").await
    }

    async fn approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError> {
        self.scan(APPROVALS, "approval").await
    }

    async fn join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        self.scan(JOIN_TOKENS, "join token").await
    }

    async fn audit_head(&self) -> Result<u64, StoreError> {
        self.read(|db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(AUDIT).map_err(unavailable)?;
            Ok(t.last()
                .map_err(unavailable)?
                .map(|(k, _)| k.value())
                .unwrap_or(0))
        })
        .await
    }

    async fn ledger_since(
        &self,
        since: i64,
        identity_id: Option<String>,
    ) -> Result<Vec<LedgerRecord>, StoreError> {
        self.read(move |db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(LEDGER).map_err(unavailable)?;
            // Ledger keys start with the issue time in big-endian nanoseconds.
            let start = (since.max(0) as u64)
                .saturating_mul(1_000_000_000)
                .to_be_bytes();
            let mut out = Vec::new();
            for item in t.range::<&[u8]>(start.as_slice()..).map_err(unavailable)? {
                let (_, v) = item.map_err(unavailable)?;
                let rec: LedgerRecord =
                    serde_json::from_slice(v.value()).map_err(|e| corrupt("ledger record", e))?;
                if identity_id
                    .as_deref()
                    .is_none_or(|id| rec.identity_id == id)
                {
                    out.push(rec);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn revocations(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        self.read(|db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(REVOCATIONS).map_err(unavailable)?;
            let mut out = Vec::new();
            for item in t.iter().map_err(unavailable)? {
                let (_, v) = item.map_err(unavailable)?;
                out.push(serde_json::from_slice(v.value()).map_err(|e| corrupt("revocation", e))?);
            }
            Ok(out)
        })
        .await
    }

    async fn audit_checkpoint(
        &self,
    ) -> Result<Option<sigil_store_core::audit::Checkpoint>, StoreError> {
        self.read(|db| {
            let r = db.begin_read().map_err(unavailable)?;
            let m = r.open_table(META).map_err(unavailable)?;
            match m.get(META_CHECKPOINT).map_err(unavailable)? {
                Some(v) => Ok(Some(
                    serde_json::from_slice(v.value())
                        .map_err(|e| corrupt("meta/audit_checkpoint", e))?,
                )),
                None => Ok(None),
            }
        })
        .await
    }

    async fn audit_anchor(&self) -> Result<Option<sigil_store_core::audit::Anchor>, StoreError> {
        self.read(|db| {
            let r = db.begin_read().map_err(unavailable)?;
            let m = r.open_table(META).map_err(unavailable)?;
            read_anchor(&m)
        })
        .await
    }

    async fn export(
        &self,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<sigil_store_core::dump::Summary, StoreError> {
        self.read(move |db| export_db(db, out)).await
    }
}

/// Writes every record of one read transaction of `db` (a consistent snapshot, however long
/// the copy takes while commits go on) as a backup.
fn export_db(
    db: &Database,
    out: Box<dyn std::io::Write + Send>,
) -> Result<sigil_store_core::dump::Summary, StoreError> {
    use sigil_store_core::dump::{DumpWriter, Record};
    fn each<T: serde::de::DeserializeOwned, K: redb::Key + 'static>(
        r: &redb::ReadTransaction,
        t: TableDefinition<K, &[u8]>,
        w: &mut DumpWriter,
        wrap: fn(T) -> Record,
    ) -> Result<(), StoreError> {
        let table = r.open_table(t).map_err(|e| corrupt(t.name(), e))?;
        for item in table.iter().map_err(unavailable)? {
            let (_, v) = item.map_err(unavailable)?;
            let rec: T = serde_json::from_slice(v.value()).map_err(|e| corrupt(t.name(), e))?;
            w.record(wrap(rec))?;
        }
        Ok(())
    }
    let r = db.begin_read().map_err(unavailable)?;
    let m = r.open_table(META).map_err(|e| corrupt("meta", e))?;
    let meta: StoreMeta = m
        .get(META_INFO)
        .map_err(unavailable)?
        .map(|g| serde_json::from_slice(g.value()))
        .transpose()
        .map_err(|e| corrupt("store_meta", e))?
        .ok_or_else(|| corrupt("meta", "store_meta is missing"))?;
    let check = m
        .get(META_KEY_CHECK)
        .map_err(unavailable)?
        .map(|g| g.value().to_vec())
        .ok_or_else(|| corrupt("meta", "key_check is missing"))?;
    let checkpoint = m
        .get(META_CHECKPOINT)
        .map_err(unavailable)?
        .map(|v| serde_json::from_slice(v.value()))
        .transpose()
        .map_err(|e| corrupt("meta/audit_checkpoint", e))?;
    let anchor = read_anchor(&m)?;
    let mut w = DumpWriter::new(out, meta, &check, checkpoint, anchor)?;
    each(&r, IDENTITIES, &mut w, Record::Identity)?;
    each(&r, JOIN_TOKENS, &mut w, Record::JoinToken)?;
    each(&r, KEYS, &mut w, Record::Key)?;
    each(&r, LEDGER, &mut w, Record::Ledger)?;
    each(&r, REVOCATIONS, &mut w, Record::Revocation)?;
    each(&r, USAGE, &mut w, Record::Usage)?;
    each(&r, OWNERS, &mut w, Record::Owner)?;
    each(&r, APPROVALS, &mut w, Record::Approval)?;
    let audit = r.open_table(AUDIT).map_err(|e| corrupt("audit", e))?;
    for item in audit.iter().map_err(unavailable)? {
        let (k, v) = item.map_err(unavailable)?;
        let entry = String::from_utf8(v.value().to_vec())
            .map_err(|e| corrupt(&format!("audit[{}]", k.value()), e))?;
        w.record(Record::Audit {
            seq: k.value(),
            entry,
        })?;
    }
    w.finish()
}

/// Writes a backup of the stopped store at `path` without writing to it (also a store a
/// crash left behind: its recovery runs in memory only). For `sigil backup --offline`.
pub fn export_file(
    path: &Path,
    out: Box<dyn std::io::Write + Send>,
) -> Result<sigil_store_core::dump::Summary, StoreError> {
    guarded(path, || {
        let (mut db, _) = open_view_noting_repair(path)?;
        integrity(path, &mut db)?;
        export_db(&db, out)
    })
}

/// Makes a new store at `path` from the backup at `backup` (checked in full first, then
/// written in one transaction); refuses if `path` exists. On failure nothing is left behind.
pub fn restore_file(
    path: &Path,
    sealer: &Sealer,
    backup: &Path,
) -> Result<sigil_store_core::dump::Summary, StoreError> {
    if path.exists() {
        return Err(StoreError::Incompatible(format!(
            "{} exists: restore makes a new store and never overwrites one",
            path.display()
        )));
    }
    let (header, _) = sigil_store_core::dump::check(backup, sealer)?;
    let result = (|| {
        let backend = RedbBackend::create(path, sealer, header.meta)?;
        let summary = sigil_store_core::dump::import_blocking(&backend, sealer, backup);
        backend.shut_down();
        summary
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(key_check_path(path));
    }
    result
}

/// Single-row durable commits per second in a scratch database under `dir` (one fsync each):
/// the floor every issuance pays, for `sigil bench --baseline`.
pub fn durable_commit_rate(dir: &Path, commits: u32) -> Result<f64, StoreError> {
    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
    let path = dir.join("baseline.redb");
    let db = Database::builder()
        .create(&path)
        .map_err(|e| open_error(&path, e))?;
    let payload = [7u8; 300];
    let started = std::time::Instant::now();
    for i in 0..commits {
        let mut tx = db.begin_write().map_err(unavailable)?;
        tx.set_durability(Durability::Immediate)
            .map_err(unavailable)?;
        tx.open_table(T)
            .map_err(unavailable)?
            .insert(u64::from(i), payload.as_slice())
            .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
    }
    Ok(f64::from(commits) / started.elapsed().as_secs_f64())
}

/// Reads every audit entry of a store file directly, without a running broker and without
/// writing to it, even when a crash left it needing recovery. For `sigil audit verify` on a
/// stopped broker's data dir (or a copy of it).
pub fn read_audit_file(path: &Path) -> Result<sigil_store_core::audit::StoredChain, StoreError> {
    guarded(path, || {
        let (mut db, _) = open_view_noting_repair(path)?;
        // A damaged file is said to be damaged, not misread as a broken chain.
        integrity(path, &mut db)?;
        let r = db.begin_read().map_err(opening)?;
        let m = r.open_table(META).map_err(|e| corrupt("meta", e))?;
        let checkpoint = m
            .get(META_CHECKPOINT)
            .map_err(opening)?
            .map(|v| serde_json::from_slice(v.value()))
            .transpose()
            .map_err(|e| corrupt("meta/audit_checkpoint", e))?;
        let anchor = read_anchor(&m)?;
        let t = r.open_table(AUDIT).map_err(|e| corrupt("audit", e))?;
        let mut entries = Vec::new();
        for item in t.iter().map_err(opening)? {
            let (k, v) = item.map_err(opening)?;
            entries.push((k.value(), v.value().to_vec()));
        }
        Ok(sigil_store_core::audit::StoredChain {
            checkpoint,
            anchor,
            entries,
        })
    })
}

fn read_anchor(
    m: &redb::ReadOnlyTable<&str, &[u8]>,
) -> Result<Option<sigil_store_core::audit::Anchor>, StoreError> {
    match m.get(META_ANCHOR).map_err(unavailable)? {
        Some(v) => Ok(Some(
            serde_json::from_slice(v.value()).map_err(|e| corrupt("meta/audit_anchor", e))?,
        )),
        None => Ok(None),
    }
}

/// Tools for tests that rewrite or damage a stopped store's file.
#[cfg(feature = "testing")]
pub mod testing {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::{AUDIT, META, META_INFO, StoreError, StoreMeta, corrupt, to_json, unavailable};
    use redb::{Database, ReadableDatabase as _, ReadableTable as _};

    /// Lets `f` edit the audit entries of the stopped store at `path` (sequence number →
    /// stored JSON) as someone with write access to the file but not the master key could,
    /// and writes the result back.
    pub fn edit_audit(
        path: &Path,
        f: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>),
    ) -> Result<(), StoreError> {
        let db = Database::open(path).map_err(unavailable)?;
        let w = db.begin_write().map_err(unavailable)?;
        {
            let mut t = w.open_table(AUDIT).map_err(unavailable)?;
            let mut entries = BTreeMap::new();
            for item in t.iter().map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                entries.insert(k.value(), v.value().to_vec());
            }
            let before: Vec<u64> = entries.keys().copied().collect();
            f(&mut entries);
            for k in before {
                t.remove(k).map_err(unavailable)?;
            }
            for (k, v) in &entries {
                t.insert(*k, v.as_slice()).map_err(unavailable)?;
            }
        }
        w.commit().map_err(unavailable)
    }

    /// Deletes the last `audit` entries and the last `ledger` rows of the stopped store at
    /// `path`, as someone with write access to the file (but not the master key) could, to
    /// hide the most recent issuances.
    pub fn truncate_tail(path: &Path, audit: usize, ledger: usize) -> Result<(), StoreError> {
        let db = Database::open(path).map_err(unavailable)?;
        let w = db.begin_write().map_err(unavailable)?;
        {
            let mut t = w.open_table(AUDIT).map_err(unavailable)?;
            for _ in 0..audit {
                t.pop_last().map_err(unavailable)?;
            }
            let mut l = w.open_table(super::LEDGER).map_err(unavailable)?;
            for _ in 0..ledger {
                l.pop_last().map_err(unavailable)?;
            }
        }
        w.commit().map_err(unavailable)
    }

    /// Rewrites the schema version recorded in the store at `path`.
    pub fn set_schema_version(path: &Path, version: u64) -> Result<(), StoreError> {
        let db = Database::open(path).map_err(unavailable)?;
        let mut meta: StoreMeta = {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(META).map_err(unavailable)?;
            let v = t
                .get(META_INFO)
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("meta", "missing"))?;
            serde_json::from_slice(v.value()).map_err(|e| corrupt("store_meta", e))?
        };
        meta.schema_version = version;
        let w = db.begin_write().map_err(unavailable)?;
        w.open_table(META)
            .map_err(unavailable)?
            .insert(META_INFO, to_json(&meta).as_slice())
            .map_err(unavailable)?;
        w.commit().map_err(unavailable)
    }
}
