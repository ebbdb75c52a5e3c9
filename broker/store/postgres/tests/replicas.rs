//! Several writers (broker replicas) on one database: every replica's observer hears every
//! committed change in the same order, within moments, pushed by NOTIFY; a join token raced
//! through two replicas is used once; exactly one replica leads, and another takes over when
//! it goes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sigil_store_core::audit::{AuditDraft, Decision};
use sigil_store_core::conformance::identity;
use sigil_store_core::model::JoinTokenRecord;
use sigil_store_core::seal::{MasterKey, Sealer};
use sigil_store_core::{
    Change, CommitObserver, Conflict, GroupCommit, Op, SCHEMA_VERSION, Store, StoreError, StoreMeta,
};
use sigil_store_postgres::local::LocalPostgres;
use sigil_store_postgres::{PgConfig, PostgresBackend};

/// Remembers, in order, what it heard: identities created and join tokens stored.
#[derive(Default)]
struct Heard(Mutex<Vec<String>>);

impl CommitObserver for Heard {
    fn committed(&self, ops: &[&Op]) {
        let mut h = self.0.lock().unwrap();
        for op in ops {
            match op {
                Op::CreateIdentity(r) => h.push(r.id.clone()),
                Op::PutJoinToken(t) => h.push(format!("token:{}", t.hash)),
                _ => {}
            }
        }
    }
}

impl Heard {
    fn list(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

fn draft(action: &str) -> AuditDraft {
    AuditDraft::new(0, "op", action, "t", Decision::Allow, "ok", "req")
}

async fn replica(cfg: &PgConfig, sealer: &Arc<Sealer>) -> (Arc<dyn Store>, Arc<Heard>) {
    let b = PostgresBackend::open(cfg, sealer).await.unwrap();
    let store: Arc<dyn Store> = Arc::new(GroupCommit::start(b, sealer.clone()).unwrap());
    let heard = Arc::new(Heard::default());
    let weak: std::sync::Weak<dyn CommitObserver> = Arc::downgrade(&heard) as _;
    store.set_observer(weak);
    (store, heard)
}

async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_database_hear_every_change_in_one_order_and_share_one_leader() {
    let pg = match LocalPostgres::start() {
        Ok(pg) => pg,
        Err(e) => {
            assert!(
                std::env::var_os("SIGIL_TEST_REQUIRE_ALL").is_none(),
                "needs PostgreSQL, and SIGIL_TEST_REQUIRE_ALL is set: {e}"
            );
            eprintln!("\n!!! SKIPPED the PostgreSQL replica test: {e} !!!\n");
            return;
        }
    };
    pg.create_database("replicas").unwrap();
    let cfg = PgConfig::new(&pg.url("replicas"), None).unwrap();
    let sealer = Arc::new(Sealer::new(&MasterKey::generate()));
    PostgresBackend::create(
        &cfg,
        &sealer,
        StoreMeta {
            schema_version: SCHEMA_VERSION,
            trust_domain: "example.org".parse().unwrap(),
            created_at: 1,
        },
    )
    .await
    .unwrap();
    let (a, heard_a) = replica(&cfg, &sealer).await;
    let (b, heard_b) = replica(&cfg, &sealer).await;
    let (c, heard_c) = replica(&cfg, &sealer).await;

    // A change committed through one replica reaches the others' observers, pushed.
    let started = Instant::now();
    a.commit(Change {
        ops: vec![Op::CreateIdentity(identity("id-0", "p0"))],
        audit: vec![draft("create")],
    })
    .await
    .unwrap();
    until("B and C hear A's change", Duration::from_secs(2), || {
        heard_b.list().contains(&"id-0".to_owned()) && heard_c.list().contains(&"id-0".to_owned())
    })
    .await;
    eprintln!(
        "a change reached two other replicas {:.1} ms after the commit began",
        started.elapsed().as_secs_f64() * 1e3
    );

    // Many changes through all three at once: every observer hears the same order.
    let mut tasks = Vec::new();
    for i in 1..=60 {
        let s = [&a, &b, &c][i % 3].clone();
        tasks.push(tokio::spawn(async move {
            s.commit(Change {
                ops: vec![Op::CreateIdentity(identity(
                    &format!("id-{i}"),
                    &format!("p{i}"),
                ))],
                audit: vec![draft("create")],
            })
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    until("every replica heard all 61", Duration::from_secs(5), || {
        [&heard_a, &heard_b, &heard_c]
            .iter()
            .all(|h| h.list().len() == 61)
    })
    .await;
    assert_eq!(heard_a.list(), heard_b.list(), "one order on A and B");
    assert_eq!(heard_a.list(), heard_c.list(), "one order on A and C");
    // And that order is the audit chain's: one chain, no gaps.
    let report = sigil_store_core::audit::verify_store(&*b, &sealer)
        .await
        .unwrap();
    assert_eq!(
        report,
        sigil_store_core::audit::ChainReport::Intact { entries: 61 }
    );

    // A join token stored through A and raced through all three: used exactly once.
    a.commit(Change {
        ops: vec![Op::PutJoinToken(JoinTokenRecord {
            hash: "race".into(),
            identity_id: "id-0".into(),
            created_at: 1,
            created_seq: 0,
            created_by: "op".into(),
            expires_at: i64::MAX,
            consumed_at: None,
        })],
        audit: vec![draft("token")],
    })
    .await
    .unwrap();
    let mut racers = Vec::new();
    for i in 0..30 {
        let s = [&a, &b, &c][i % 3].clone();
        racers.push(tokio::spawn(async move {
            s.commit(Change {
                ops: vec![Op::ConsumeJoinToken {
                    hash: "race".into(),
                    now: 2,
                }],
                audit: vec![draft("attest")],
            })
            .await
        }));
    }
    let mut won = 0;
    for r in racers {
        match r.await.unwrap() {
            Ok(_) => won += 1,
            Err(StoreError::Conflict(Conflict::JoinTokenUsed)) => {}
            Err(e) => panic!("a racer: {e}"),
        }
    }
    assert_eq!(won, 1, "one attestation per join token across replicas");

    // Exactly one leader; when it goes, another takes over within seconds.
    until("a leader", Duration::from_secs(5), || {
        [&a, &b, &c].iter().filter(|s| s.is_leader()).count() == 1
    })
    .await;
    let replicas = [a, b, c];
    let leader = replicas.iter().position(|s| s.is_leader()).unwrap();
    replicas[leader].close().await;
    let gone = Instant::now();
    until("a new leader", Duration::from_secs(5), || {
        replicas
            .iter()
            .enumerate()
            .filter(|(i, s)| *i != leader && s.is_leader())
            .count()
            == 1
    })
    .await;
    eprintln!(
        "a new leader {:.2} s after the old one closed",
        gone.elapsed().as_secs_f64()
    );
}
