//! The conformance suite against the PostgreSQL backend, on a private PostgreSQL server this
//! test starts (one database per store the suite makes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sigil_store_core::conformance::{Harness, run};
use sigil_store_core::seal::Sealer;
use sigil_store_core::{GroupCommit, Store, StoreError, StoreMeta};
use sigil_store_postgres::local::LocalPostgres;
use sigil_store_postgres::{FaultSwitch, PgConfig, PostgresBackend};

struct PgHarness {
    pg: LocalPostgres,
    faults: Mutex<HashMap<String, FaultSwitch>>,
    dbs: Mutex<HashMap<String, String>>,
}

impl PgHarness {
    /// The database of store `name`, created on first use.
    fn cfg(&self, name: &str) -> PgConfig {
        let mut dbs = self.dbs.lock().unwrap();
        let n = dbs.len();
        let db = dbs
            .entry(name.to_owned())
            .or_insert_with(|| {
                let db = format!("conformance_{n}");
                self.pg.create_database(&db).unwrap();
                db
            })
            .clone();
        PgConfig::new(&self.pg.url(&db), None).unwrap()
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
impl Harness for PgHarness {
    async fn create(
        &self,
        name: &str,
        sealer: Arc<Sealer>,
        meta: StoreMeta,
    ) -> Result<Arc<dyn Store>, StoreError> {
        PostgresBackend::create(&self.cfg(name), &sealer, meta).await?;
        self.open(name, sealer).await
    }
    async fn open(&self, name: &str, sealer: Arc<Sealer>) -> Result<Arc<dyn Store>, StoreError> {
        let backend =
            PostgresBackend::open_with_faults(&self.cfg(name), &sealer, Some(self.faults(name)))
                .await?;
        Ok(Arc::new(GroupCommit::start(backend, sealer)?))
    }
    fn fail_writes(&self, name: &str, on: bool) {
        self.faults(name).fail_writes(on);
    }
    async fn set_schema_version(&self, name: &str, version: u64) {
        sigil_store_postgres::testing::set_schema_version(&self.cfg(name), version)
            .await
            .unwrap();
    }
    async fn restore(
        &self,
        name: &str,
        sealer: Arc<Sealer>,
        backup: &std::path::Path,
    ) -> Result<Arc<dyn Store>, StoreError> {
        let cfg = self.cfg(name);
        let (c, s, b) = (cfg.clone(), sealer.clone(), backup.to_owned());
        tokio::task::spawn_blocking(move || sigil_store_postgres::restore_blocking(&c, &s, &b))
            .await
            .unwrap()?;
        self.open(name, sealer).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_backend_passes_the_conformance_suite() {
    let pg = match LocalPostgres::start() {
        Ok(pg) => pg,
        Err(e) => {
            assert!(
                std::env::var_os("SIGIL_TEST_REQUIRE_ALL").is_none(),
                "the PostgreSQL conformance suite needs PostgreSQL, and SIGIL_TEST_REQUIRE_ALL is set: {e}"
            );
            eprintln!("\n!!! SKIPPED the PostgreSQL conformance suite: {e} !!!\n");
            return;
        }
    };
    run(&PgHarness {
        pg,
        faults: Mutex::default(),
        dbs: Mutex::default(),
    })
    .await;
}
