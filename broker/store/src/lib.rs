//! Sigil's store as the broker sees it: the [`Store`] trait, the records and the change model
//! (all from `sigil-store-core`), and the one place a backend is chosen and opened
//! ([`open`], [`create`]). Nothing outside the store crates names a backend.
//!
//! Backends: redb (embedded, one file; the default) and PostgreSQL (several broker replicas
//! on one database).

use std::path::PathBuf;
use std::sync::Arc;

pub use sigil_store_core::*;

use sigil_store_core::seal::Sealer;
pub use sigil_store_postgres::PgConfig;
use sigil_store_postgres::PostgresBackend;
pub use sigil_store_postgres::local;
use sigil_store_redb::RedbBackend;

/// Where the store is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreConfig {
    /// An embedded redb file.
    Redb {
        /// The file (`DATA_DIR/sigil.redb`).
        path: PathBuf,
    },
    /// A PostgreSQL database shared by broker replicas (its password never printed).
    Postgres(PgConfig),
}

/// The embedded store's file name inside a data dir.
const EMBEDDED_FILE: &str = "sigil.redb";

impl StoreConfig {
    /// The embedded store of a data dir (the default when nothing else is configured).
    pub fn in_data_dir(dir: &std::path::Path) -> Self {
        StoreConfig::redb(dir.join(EMBEDDED_FILE))
    }

    /// A PostgreSQL store at `url` (`postgres://user:password@host:port/db`), its server
    /// verified with the CA certificates in `ca_file` when TLS is used.
    pub fn postgres(url: &str, ca_file: Option<PathBuf>) -> Result<Self, StoreError> {
        Ok(StoreConfig::Postgres(PgConfig::new(url, ca_file)?))
    }

    /// Whether an embedded store is there already (for `init` and `dev`, which must not
    /// overwrite one); a database server says so itself when `create` is refused.
    pub fn exists(&self) -> bool {
        match self {
            StoreConfig::Redb { path } => path.exists(),
            StoreConfig::Postgres(_) => false,
        }
    }

    /// Whether several brokers may serve from this store at once.
    pub fn shared(&self) -> bool {
        matches!(self, StoreConfig::Postgres(_))
    }

    /// The files that hold an embedded store, the database first (for size reports, backups
    /// and tests that damage them); none for a database server.
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            StoreConfig::Redb { path } => {
                vec![path.clone(), sigil_store_redb::key_check_path(path)]
            }
            StoreConfig::Postgres(_) => Vec::new(),
        }
    }

    /// An embedded store in the file `path`.
    pub fn redb(path: impl Into<PathBuf>) -> Self {
        StoreConfig::Redb { path: path.into() }
    }

    /// How the store is named in messages (never with a secret in it).
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Redb { path } => path.display().to_string(),
            StoreConfig::Postgres(pg) => pg.describe(),
        }
    }
}

/// Options for opening a store.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Most changes waiting for the writer before new ones are shed
    /// ([`StoreError::Overloaded`]); `None` is [`WRITER_QUEUE`].
    pub writer_queue: Option<usize>,
    /// Makes the store's writes fail on demand.
    #[cfg(feature = "faults")]
    pub faults: Option<FaultSwitch>,
}

/// Creates a new, empty store with `meta`; refuses one that exists.
pub async fn create(
    cfg: &StoreConfig,
    sealer: Arc<Sealer>,
    meta: StoreMeta,
) -> Result<Arc<dyn Store>, StoreError> {
    match cfg {
        StoreConfig::Redb { path } => {
            let (path, s) = (path.clone(), sealer.clone());
            let backend = blocking(move || RedbBackend::create(&path, &s, meta)).await?;
            Ok(Arc::new(GroupCommit::start(backend, sealer)?))
        }
        StoreConfig::Postgres(pg) => {
            PostgresBackend::create(pg, &sealer, meta).await?;
            let backend = PostgresBackend::open(pg, &sealer).await?;
            Ok(Arc::new(GroupCommit::start(backend, sealer)?))
        }
    }
}

/// Opens an existing store, having checked (without writing anything) that it is a store this
/// build reads and that `sealer`'s master key is the one it was created with.
pub async fn open(
    cfg: &StoreConfig,
    sealer: Arc<Sealer>,
    opts: OpenOptions,
) -> Result<Arc<dyn Store>, StoreError> {
    let queue = opts.writer_queue.unwrap_or(WRITER_QUEUE);
    match cfg {
        StoreConfig::Redb { path } => {
            let (path, s) = (path.clone(), sealer.clone());
            #[cfg(feature = "faults")]
            let backend =
                blocking(move || RedbBackend::open_with_faults(&path, &s, opts.faults)).await?;
            #[cfg(not(feature = "faults"))]
            let backend = blocking(move || RedbBackend::open(&path, &s)).await?;
            Ok(Arc::new(GroupCommit::start_with_queue(
                backend, sealer, queue,
            )?))
        }
        StoreConfig::Postgres(pg) => {
            #[cfg(feature = "faults")]
            let backend = PostgresBackend::open_with_faults(pg, &sealer, opts.faults).await?;
            #[cfg(not(feature = "faults"))]
            let backend = PostgresBackend::open(pg, &sealer).await?;
            // GroupCommit::start waits for the writer to read the commit log's position.
            let s = sealer.clone();
            let store = blocking(move || GroupCommit::start_with_queue(backend, s, queue)).await?;
            Ok(Arc::new(store))
        }
    }
}

/// Brings a database's schema up to this build's (`sigil migrate --to URL`); returns the
/// version it found. A database newer than this build is refused.
pub async fn migrate_schema(cfg: &StoreConfig) -> Result<Option<(i64, i64)>, StoreError> {
    match cfg {
        StoreConfig::Redb { .. } => Ok(None),
        StoreConfig::Postgres(pg) => {
            let found = sigil_store_postgres::migrate(pg).await?;
            Ok(Some((found, sigil_store_postgres::schema::VERSION)))
        }
    }
}

/// Checks the master key against the store without opening it for writing.
pub fn check_master_key(cfg: &StoreConfig, sealer: &Sealer) -> Result<(), StoreError> {
    match cfg {
        StoreConfig::Redb { path } => sigil_store_redb::check_master_key(path, sealer),
        StoreConfig::Postgres(pg) => sigil_store_postgres::block_on_own_thread(|| {
            sigil_store_postgres::check_master_key(pg, sealer)
        }),
    }
}

/// Every kept audit entry, the retention checkpoint they start after and the anchor of their
/// end, read straight from the store without a running broker and without writing to it (for
/// `sigil audit verify --offline`, also on a store a crash left behind). A damaged file is an
/// error saying so.
pub fn read_audit_offline(cfg: &StoreConfig) -> Result<audit::StoredChain, StoreError> {
    match cfg {
        StoreConfig::Redb { path } => sigil_store_redb::read_audit_file(path),
        StoreConfig::Postgres(pg) => {
            sigil_store_postgres::block_on_own_thread(|| sigil_store_postgres::read_audit(pg))
        }
    }
}

/// Checks a stopped store's files without writing to them (what `serve` checks at start):
/// redb's page checksums, and every record when it was not closed cleanly.
pub fn check_offline(cfg: &StoreConfig) -> Result<Inspection, StoreError> {
    match cfg {
        StoreConfig::Redb { path } => sigil_store_redb::check_file(path),
        // The database checks its own pages; a crash leaves nothing to recover here.
        StoreConfig::Postgres(_) => Ok(Inspection { unclean: false }),
    }
}

pub use sigil_store_redb::Inspection;

/// Writes a backup ([`dump`]) of a stopped store without writing to it (also one a crash left
/// behind). A running broker's store is backed up through the broker instead.
pub fn export_offline(
    cfg: &StoreConfig,
    out: Box<dyn std::io::Write + Send>,
) -> Result<dump::Summary, StoreError> {
    match cfg {
        StoreConfig::Redb { path } => sigil_store_redb::export_file(path, out),
        StoreConfig::Postgres(pg) => {
            sigil_store_postgres::block_on_own_thread(|| sigil_store_postgres::export(pg, out))
        }
    }
}

/// Makes a new store from the backup file `backup` (checked in full first: complete,
/// unaltered, made under `sealer`'s master key, its audit chain intact to its anchor; then
/// written in one transaction). Refuses a store that exists; leaves nothing behind on failure.
pub fn restore(
    cfg: &StoreConfig,
    sealer: &Sealer,
    backup: &std::path::Path,
) -> Result<dump::Summary, StoreError> {
    match cfg {
        StoreConfig::Redb { path } => sigil_store_redb::restore_file(path, sealer, backup),
        StoreConfig::Postgres(pg) => sigil_store_postgres::restore_blocking(pg, sealer, backup),
    }
}

/// Durable single-row commits per second of the embedded store's medium, measured in a
/// scratch database under `dir`: the floor every issuance pays (`sigil bench --baseline`).
pub fn durable_commit_rate(dir: &std::path::Path, commits: u32) -> Result<f64, StoreError> {
    sigil_store_redb::durable_commit_rate(dir, commits)
}

/// Tools for tests that damage or rewrite a stopped store, as an attacker with write access
/// to its files (but not the master key) could.
#[cfg(feature = "testing")]
pub mod testing {
    use std::collections::BTreeMap;

    use super::{StoreConfig, StoreError};

    /// Lets `f` edit the audit entries (sequence number → stored JSON) of the stopped store.
    pub fn edit_audit(
        cfg: &StoreConfig,
        f: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>),
    ) -> Result<(), StoreError> {
        match cfg {
            StoreConfig::Redb { path } => sigil_store_redb::testing::edit_audit(path, f),
            StoreConfig::Postgres(_) => Err(StoreError::Unavailable(
                "edit_audit is for embedded stores".into(),
            )),
        }
    }

    /// Deletes the last `audit` entries and `ledger` rows of the stopped store.
    pub fn truncate_tail(cfg: &StoreConfig, audit: usize, ledger: usize) -> Result<(), StoreError> {
        match cfg {
            StoreConfig::Redb { path } => {
                sigil_store_redb::testing::truncate_tail(path, audit, ledger)
            }
            StoreConfig::Postgres(pg) => sigil_store_postgres::block_on_own_thread(|| {
                sigil_store_postgres::testing::truncate_tail(pg, audit as i64, ledger as i64)
            }),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("store task: {e}")))?
}
