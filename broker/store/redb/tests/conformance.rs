//! The conformance suite against the redb backend: real files in a temp dir, write failures
//! injected below redb (as a full disk would fail them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sigil_store_core::conformance::{Harness, run};
use sigil_store_core::seal::Sealer;
use sigil_store_core::{GroupCommit, Store, StoreError, StoreMeta};
use sigil_store_redb::{FaultSwitch, RedbBackend};

struct RedbHarness {
    dir: tempfile::TempDir,
    faults: Mutex<HashMap<String, FaultSwitch>>,
}

impl RedbHarness {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.db"))
    }
    fn faults(&self, name: &str) -> FaultSwitch {
        self.faults
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }
}

#[async_trait]
impl Harness for RedbHarness {
    async fn create(
        &self,
        name: &str,
        sealer: Arc<Sealer>,
        meta: StoreMeta,
    ) -> Result<Arc<dyn Store>, StoreError> {
        let path = self.path(name);
        RedbBackend::create(&path, &sealer, meta)?;
        // Reopened through the fault switch, so failures can be injected later.
        self.open(name, sealer).await
    }
    async fn open(&self, name: &str, sealer: Arc<Sealer>) -> Result<Arc<dyn Store>, StoreError> {
        let (path, faults, s) = (self.path(name), self.faults(name), sealer.clone());
        let backend = tokio::task::spawn_blocking(move || {
            RedbBackend::open_with_faults(&path, &s, Some(faults))
        })
        .await
        .unwrap()?;
        Ok(Arc::new(GroupCommit::start(backend, sealer)?))
    }
    fn fail_writes(&self, name: &str, on: bool) {
        self.faults(name).fail_writes(on);
    }
    async fn restore(
        &self,
        name: &str,
        sealer: Arc<Sealer>,
        backup: &std::path::Path,
    ) -> Result<Arc<dyn Store>, StoreError> {
        let (path, b, s) = (self.path(name), backup.to_owned(), sealer.clone());
        tokio::task::spawn_blocking(move || sigil_store_redb::restore_file(&path, &s, &b))
            .await
            .unwrap()?;
        self.open(name, sealer).await
    }
    async fn set_schema_version(&self, name: &str, version: u64) {
        sigil_store_redb::testing::set_schema_version(&self.path(name), version).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redb_backend_passes_the_conformance_suite() {
    run(&RedbHarness {
        dir: tempfile::tempdir().unwrap(),
        faults: Mutex::default(),
    })
    .await;
}
