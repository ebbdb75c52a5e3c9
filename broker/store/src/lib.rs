//! Sigil's store as the broker sees it: the [`Store`] trait, the records and the change model
//! (all from `sigil-store-core`), and the one place a backend is chosen and opened
//! ([`open`], [`create`]). Nothing outside the store crates names a backend.
//!
//! Backends: redb (embedded, one file; the default).

use std::path::PathBuf;
use std::sync::Arc;

pub use sigil_store_core::*;

use sigil_store_core::seal::Sealer;
#[cfg(feature = "faults")]
pub use sigil_store_redb::FaultSwitch;
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
}

/// The embedded store's file name inside a data dir.
const EMBEDDED_FILE: &str = "sigil.redb";

impl StoreConfig {
    /// The embedded store of a data dir (the default when nothing else is configured).
    pub fn in_data_dir(dir: &std::path::Path) -> Self {
        StoreConfig::redb(dir.join(EMBEDDED_FILE))
    }

    /// Whether a store is there already (for `init` and `dev`, which must not overwrite one).
    pub fn exists(&self) -> bool {
        match self {
            StoreConfig::Redb { path } => path.exists(),
        }
    }

    /// The files that hold an embedded store, the database first (for size reports, backups
    /// and tests that damage them); none for a database server.
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            StoreConfig::Redb { path } => {
                vec![path.clone(), sigil_store_redb::key_check_path(path)]
            }
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
        }
    }
}

/// Options for opening a store.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Makes the store's disk writes fail on demand.
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
    }
}

/// Opens an existing store, having checked (without writing anything) that it is a store this
/// build reads and that `sealer`'s master key is the one it was created with.
pub async fn open(
    cfg: &StoreConfig,
    sealer: Arc<Sealer>,
    opts: OpenOptions,
) -> Result<Arc<dyn Store>, StoreError> {
    match cfg {
        StoreConfig::Redb { path } => {
            let (path, s) = (path.clone(), sealer.clone());
            #[cfg(feature = "faults")]
            let backend =
                blocking(move || RedbBackend::open_with_faults(&path, &s, opts.faults)).await?;
            #[cfg(not(feature = "faults"))]
            let backend = {
                let _ = opts;
                blocking(move || RedbBackend::open(&path, &s)).await?
            };
            Ok(Arc::new(GroupCommit::start(backend, sealer)?))
        }
    }
}

/// Checks the master key against the store without opening it for writing.
pub fn check_master_key(cfg: &StoreConfig, sealer: &Sealer) -> Result<(), StoreError> {
    match cfg {
        StoreConfig::Redb { path } => sigil_store_redb::check_master_key(path, sealer),
    }
}

/// Every kept audit entry, the retention checkpoint they start after and the anchor of their
/// end, read straight from the store without a running broker and without writing to it (for
/// `sigil audit verify --offline`, also on a store a crash left behind). A damaged file is an
/// error saying so.
pub fn read_audit_offline(cfg: &StoreConfig) -> Result<audit::StoredChain, StoreError> {
    match cfg {
        StoreConfig::Redb { path } => sigil_store_redb::read_audit_file(path),
    }
}

/// Checks a stopped store's files without writing to them (what `serve` checks at start):
/// redb's page checksums, and every record when it was not closed cleanly.
pub fn check_offline(cfg: &StoreConfig) -> Result<Inspection, StoreError> {
    match cfg {
        StoreConfig::Redb { path } => sigil_store_redb::check_file(path),
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
        }
    }

    /// Deletes the last `audit` entries and `ledger` rows of the stopped store.
    pub fn truncate_tail(cfg: &StoreConfig, audit: usize, ledger: usize) -> Result<(), StoreError> {
        match cfg {
            StoreConfig::Redb { path } => {
                sigil_store_redb::testing::truncate_tail(path, audit, ledger)
            }
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
