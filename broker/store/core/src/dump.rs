//! Backups: every record of a store, read in one consistent snapshot, as one file that any
//! backend can be restored from (`sigil backup`, `sigil restore`, `sigil migrate`).
//!
//! The format (`sigil-backup/1`) is JSON lines, independent of how a backend encodes its rows:
//! - the first line is the [`Header`]: the store's facts, its sealed key check, and where its
//!   audit chain starts (the retention checkpoint) and ends (the anchor);
//! - then one line per [`Record`], audit entries last and in order, each exactly as stored
//!   (so every chain hash and MAC is kept);
//! - the last line is the [`Trailer`]: how many records, and the SHA-256 of every byte before
//!   it.
//!
//! A restore reads the file twice: first to check it all — the trailer, the key check against
//! the master key it was given, and the audit chain from its checkpoint to exactly its anchor
//! — writing nothing; then to write it into a new, empty store in one transaction. A truncated,
//! edited or foreign backup is refused before the target is touched.
//!
//! Private keys stay sealed under the master key: a backup is no use without it, and the
//! master key is never in one.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::audit::{Anchor, AuditEntry, ChainReport, ChainVerifier, Checkpoint, End};
use crate::backend::{Backend, Write as BackendWrite};
use crate::model::{
    ApprovalRecord, IdentityRecord, JoinTokenRecord, KeyRecord, LedgerRecord, OwnerRecord,
    RevocationRecord, UsageRecord,
};
use crate::seal::Sealer;
use crate::{SCHEMA_VERSION, StoreError, StoreMeta};

/// The format this build writes and reads.
pub const FORMAT: &str = "sigil-backup/1";

/// Records written to the target per call while restoring.
const CHUNK: usize = 1024;

/// The first line of a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    /// [`FORMAT`].
    pub format: String,
    /// The store's facts (schema version, trust domain, creation time).
    pub meta: StoreMeta,
    /// The store's key check (base64), so a restore with another master key is refused.
    pub key_check: String,
    /// Unix seconds when the snapshot was read.
    pub taken_at: i64,
    /// Where the kept audit chain starts, if retention removed older entries.
    pub checkpoint: Option<Checkpoint>,
    /// Where the audit chain ends.
    pub anchor: Option<Anchor>,
}

/// One stored record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Record {
    /// An identity.
    Identity(IdentityRecord),
    /// A join token (its hash; the token itself is never stored).
    JoinToken(JoinTokenRecord),
    /// A signing key (its private half sealed).
    Key(KeyRecord),
    /// An issued credential.
    Ledger(LedgerRecord),
    /// A revocation.
    Revocation(RevocationRecord),
    /// An identity's usage.
    Usage(UsageRecord),
    /// An owner.
    Owner(OwnerRecord),
    /// An approval.
    Approval(ApprovalRecord),
    /// An audit entry, exactly as stored.
    Audit {
        /// Its sequence number.
        seq: u64,
        /// The stored JSON.
        entry: String,
    },
}

/// The last line of a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trailer {
    /// Records between the header and the trailer.
    pub records: u64,
    /// Hex SHA-256 of every byte before the trailer's line.
    pub sha256: String,
}

/// Every line is one of these (parsed one at a time, so the size of the largest does not
/// matter).
#[derive(Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
#[serde(rename_all = "snake_case")]
enum Line {
    Header(Header),
    #[serde(rename = "end")]
    Trailer(Trailer),
    #[serde(untagged)]
    Record(Record),
}

/// What a backup holds, as counted while writing or checking it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Identities.
    pub identities: u64,
    /// Join tokens.
    pub join_tokens: u64,
    /// Signing keys.
    pub keys: u64,
    /// Ledger records.
    pub ledger: u64,
    /// Revocations.
    pub revocations: u64,
    /// Usage records.
    pub usage: u64,
    /// Owners.
    pub owners: u64,
    /// Approvals.
    pub approvals: u64,
    /// Audit entries kept.
    pub audit: u64,
    /// The audit chain's last sequence number.
    pub audit_head: u64,
}

impl Summary {
    fn count(&mut self, r: &Record) {
        match r {
            Record::Identity(_) => self.identities += 1,
            Record::JoinToken(_) => self.join_tokens += 1,
            Record::Key(_) => self.keys += 1,
            Record::Ledger(_) => self.ledger += 1,
            Record::Revocation(_) => self.revocations += 1,
            Record::Usage(_) => self.usage += 1,
            Record::Owner(_) => self.owners += 1,
            Record::Approval(_) => self.approvals += 1,
            Record::Audit { seq, .. } => {
                self.audit += 1;
                self.audit_head = *seq;
            }
        }
    }

    fn records(&self) -> u64 {
        self.identities
            + self.join_tokens
            + self.keys
            + self.ledger
            + self.revocations
            + self.usage
            + self.owners
            + self.approvals
            + self.audit
    }
}

/// Writes a backup: the header now, then [`DumpWriter::record`] for every record (audit
/// entries last, in order), then [`DumpWriter::finish`]. A backend's export drives it from one
/// read snapshot.
pub struct DumpWriter {
    out: Box<dyn Write + Send>,
    hash: digest::Context,
    summary: Summary,
}

impl std::fmt::Debug for DumpWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DumpWriter")
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl DumpWriter {
    /// Starts a backup of a store with these facts.
    pub fn new(
        out: Box<dyn Write + Send>,
        meta: StoreMeta,
        key_check: &[u8],
        checkpoint: Option<Checkpoint>,
        anchor: Option<Anchor>,
    ) -> Result<Self, StoreError> {
        let mut w = DumpWriter {
            out,
            hash: digest::Context::new(&digest::SHA256),
            summary: Summary::default(),
        };
        let taken_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        w.line(&Line::Header(Header {
            format: FORMAT.into(),
            meta,
            key_check: B64.encode(key_check),
            taken_at,
            checkpoint,
            anchor,
        }))?;
        Ok(w)
    }

    /// Writes one record.
    pub fn record(&mut self, r: Record) -> Result<(), StoreError> {
        self.summary.count(&r);
        self.line(&Line::Record(r))
    }

    /// Writes the trailer and flushes; returns what was written.
    pub fn finish(mut self) -> Result<Summary, StoreError> {
        let sha256 = sigil_pki::ids::to_hex(self.hash.clone().finish().as_ref());
        let trailer = Line::Trailer(Trailer {
            records: self.summary.records(),
            sha256,
        });
        let mut bytes = serde_json::to_vec(&trailer).map_err(write_error)?;
        bytes.push(b'\n');
        self.out.write_all(&bytes).map_err(write_error)?;
        self.out.flush().map_err(write_error)?;
        Ok(self.summary)
    }

    fn line(&mut self, l: &Line) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec(l).map_err(write_error)?;
        bytes.push(b'\n');
        self.hash.update(&bytes);
        self.out.write_all(&bytes).map_err(write_error)
    }
}

fn write_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("writing the backup: {e}"))
}

fn bad(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Incompatible(format!(
        "{} is not a usable Sigil backup: {what}; nothing was written",
        path.display()
    ))
}

/// Checks the whole backup at `path` without writing anything: its format and schema, that it
/// is complete and unaltered (trailer), that `sealer`'s master key is the one its store was
/// made with, and that its audit chain is intact from its checkpoint to exactly its anchor.
/// Returns its header and what it holds.
pub fn check(path: &Path, sealer: &Sealer) -> Result<(Header, Summary), StoreError> {
    walk(path, Some(sealer))
}

/// What can be checked without the master key: the format, and that the backup is complete
/// and unaltered since it was written (trailer). Not proof against someone who rewrites the
/// whole file: [`check`] also checks the key and the audit chain's MACs.
pub fn inspect(path: &Path) -> Result<(Header, Summary), StoreError> {
    walk(path, None)
}

fn walk(path: &Path, sealer: Option<&Sealer>) -> Result<(Header, Summary), StoreError> {
    let mut lines = open_lines(path)?;
    let (header, first) = read_header(path, &mut lines)?;
    if let Some(sealer) = sealer
        && !key_matches(&header, sealer)
    {
        return Err(StoreError::Incompatible(format!(
            "{} was made from a store with another master key (or it was altered); nothing was written. Restore with the master key of the store it came from",
            path.display()
        )));
    }
    let mut hash = digest::Context::new(&digest::SHA256);
    hash.update(&first);
    let mut summary = Summary::default();
    let mut chain =
        sealer.map(|s| ChainVerifier::new(s, header.checkpoint.as_ref(), header.anchor.as_ref()));
    let mut chain_ok = true;
    let mut audit_started = false;
    let mut n = 1u64;
    loop {
        let Some(raw) = lines.next() else {
            return Err(bad(path, "it ends without its trailer (truncated)"));
        };
        n += 1;
        let raw = raw.map_err(|e| bad(path, format!("line {n}: {e}")))?;
        let line: Line =
            serde_json::from_slice(&raw).map_err(|e| bad(path, format!("line {n}: {e}")))?;
        match line {
            Line::Header(_) => return Err(bad(path, format!("line {n}: a second header"))),
            Line::Trailer(t) => {
                let got = sigil_pki::ids::to_hex(hash.finish().as_ref());
                if t.sha256 != got || t.records != summary.records() {
                    return Err(bad(
                        path,
                        "its content does not match its trailer (edited or damaged)",
                    ));
                }
                if lines.next().is_some() {
                    return Err(bad(path, "there is more after its trailer"));
                }
                break;
            }
            Line::Record(r) => {
                hash.update(&raw);
                hash.update(b"\n");
                match &r {
                    Record::Audit { seq, entry } => {
                        audit_started = true;
                        if let Some(chain) = chain.as_mut()
                            && chain_ok
                        {
                            chain_ok = chain.feed(*seq, entry.as_bytes());
                        }
                    }
                    _ if audit_started => {
                        return Err(bad(
                            path,
                            format!("line {n}: a record after the audit entries"),
                        ));
                    }
                    _ => {}
                }
                summary.count(&r);
            }
        }
    }
    match chain.map(|c| c.finish(End::Exact)) {
        None | Some(ChainReport::Intact { .. }) => Ok((header, summary)),
        Some(ChainReport::Broken { seq, reason }) => Err(bad(
            path,
            format!("its audit chain is broken at entry {seq}: {reason}"),
        )),
    }
}

/// Writes the backup at `path` into `backend`, a new, empty store made with the backup's
/// facts, in one transaction: all of it or nothing. Checks it first ([`check`]).
pub async fn import<B: Backend>(
    backend: &B,
    sealer: &Sealer,
    path: &Path,
) -> Result<Summary, StoreError> {
    let (header, summary) = check(path, sealer)?;
    let mut lines = open_lines(path)?;
    read_header(path, &mut lines)?;
    let mut txn = backend.begin().await?;
    // Where retention left the chain first (removing nothing from the empty target).
    if let Some(c) = &header.checkpoint {
        txn.write(&[BackendWrite::PruneAudit(c)]).await?;
    }
    let mut chunk: Vec<Record> = Vec::with_capacity(CHUNK);
    for raw in lines {
        let raw = raw.map_err(|e| bad(path, e))?;
        match serde_json::from_slice::<Line>(&raw).map_err(|e| bad(path, e))? {
            Line::Record(r) => chunk.push(r),
            Line::Trailer(_) => break,
            Line::Header(_) => return Err(bad(path, "a second header")),
        }
        if chunk.len() == CHUNK {
            write_chunk(&mut *txn, &chunk, path).await?;
            chunk.clear();
        }
    }
    write_chunk(&mut *txn, &chunk, path).await?;
    if let Some(a) = header.anchor {
        txn.write(&[BackendWrite::PutAnchor(a)]).await?;
    }
    txn.commit().await?;
    Ok(summary)
}

/// [`import`] on a thread of its own with its own runtime (a backend's transaction need not be
/// `Send`), for callers anywhere, async or not.
pub fn import_blocking<B: Backend + Sync>(
    backend: &B,
    sealer: &Sealer,
    path: &Path,
) -> Result<Summary, StoreError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError::Unavailable(format!("restore runtime: {e}")))?;
            rt.block_on(import(backend, sealer, path))
        })
        .join()
        .map_err(|_| StoreError::Unavailable("the restore thread panicked".into()))?
    })
}

async fn write_chunk(
    txn: &mut dyn crate::backend::Txn,
    chunk: &[Record],
    path: &Path,
) -> Result<(), StoreError> {
    let mut writes = Vec::with_capacity(chunk.len());
    for r in chunk {
        writes.push(match r {
            Record::Identity(rec) => BackendWrite::PutIdentity {
                record: rec,
                replaces_spiffe_id: None,
            },
            Record::JoinToken(rec) => BackendWrite::PutJoinToken(std::borrow::Cow::Borrowed(rec)),
            Record::Key(rec) => BackendWrite::PutKey(rec),
            Record::Ledger(rec) => BackendWrite::AppendLedger(rec),
            Record::Revocation(rec) => BackendWrite::PutRevocation(rec),
            Record::Usage(rec) => BackendWrite::PutUsage {
                identity_id: rec.identity_id.clone(),
                usage: rec.clone(),
            },
            Record::Owner(rec) => BackendWrite::PutOwner(rec),
            Record::Approval(rec) => BackendWrite::PutApproval(rec),
            Record::Audit { seq, entry } => {
                let e: AuditEntry = serde_json::from_str(entry)
                    .map_err(|e| bad(path, format!("audit entry {seq}: {e}")))?;
                BackendWrite::AppendAudit {
                    seq: *seq,
                    hash: e.hash,
                    bytes: entry.as_bytes().to_vec(),
                }
            }
        });
    }
    txn.write(&writes).await
}

type Lines = std::io::Split<BufReader<std::fs::File>>;

fn open_lines(path: &Path) -> Result<Lines, StoreError> {
    let f = std::fs::File::open(path)
        .map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))?;
    Ok(BufReader::new(f).split(b'\n'))
}

/// The header, and its line's bytes (newline included) for the hash.
fn read_header(path: &Path, lines: &mut Lines) -> Result<(Header, Vec<u8>), StoreError> {
    let first = lines
        .next()
        .ok_or_else(|| bad(path, "it is empty"))?
        .map_err(|e| bad(path, e))?;
    let header = match serde_json::from_slice::<Line>(&first) {
        Ok(Line::Header(h)) => h,
        _ => {
            return Err(bad(
                path,
                format!("it does not start with a {FORMAT} header"),
            ));
        }
    };
    if header.format != FORMAT {
        return Err(bad(
            path,
            format!(
                "it is in format {}, this build reads {FORMAT}",
                header.format
            ),
        ));
    }
    if header.meta.schema_version > SCHEMA_VERSION {
        return Err(bad(
            path,
            format!(
                "its store has schema version {}, newer than this build's {SCHEMA_VERSION}: restore it with a newer sigil",
                header.meta.schema_version
            ),
        ));
    }
    let check = B64
        .decode(header.key_check.as_bytes())
        .map_err(|e| bad(path, format!("its key check: {e}")))?;
    if check.len() < crate::seal::KEY_CHECK_LEN {
        return Err(bad(path, "its key check is torn"));
    }
    let mut bytes = first;
    bytes.push(b'\n');
    Ok((header, bytes))
}

/// Whether `sealer`'s key is the one the backup's store was made with.
pub fn key_matches(header: &Header, sealer: &Sealer) -> bool {
    B64.decode(header.key_check.as_bytes())
        .is_ok_and(|c| sealer.opens_key_check(&c))
}
