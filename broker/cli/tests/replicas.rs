//! Several real `sigil serve` processes on one private PostgreSQL server (started here):
//! one registry, one revocation feed and one use per join token across replicas; kill -9 of a
//! replica under load; PostgreSQL restarted under load; a replica cut from the database and
//! healed; and `sigil migrate` of an embedded store with 100,000 ledger rows.
//!
//! They skip loudly where PostgreSQL is not installed, and fail instead under
//! SIGIL_TEST_REQUIRE_ALL (as in CI, which installs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sigil_proto::v1 as pb;
use sigil_sdk::{
    ClientConfig, Evidence, JwtRequest, Source, SourceConfig, SourceEvent, SvidOptions,
    WorkloadClient,
};
use sigil_store::local::LocalPostgres;

mod common;
use common::*;

/// A private PostgreSQL with a store made by `sigil init --store`, and the data dir `init`
/// wrote (config, master key, operator credential, bundle), which replicas copy.
struct Cluster {
    pg: LocalPostgres,
    db_url: String,
    tmp: tempfile::TempDir,
    seed: PathBuf,
}

fn cluster(test: &str) -> Option<Cluster> {
    let pg = match LocalPostgres::start() {
        Ok(pg) => pg,
        Err(e) => {
            assert!(
                std::env::var_os("SIGIL_TEST_REQUIRE_ALL").is_none(),
                "{test} needs PostgreSQL, and SIGIL_TEST_REQUIRE_ALL is set: {e}"
            );
            eprintln!("\n!!! SKIPPED {test}: {e} !!!\n");
            return None;
        }
    };
    pg.create_database("sigil").unwrap();
    let db_url = pg.url("sigil");
    let tmp = tempfile::tempdir().unwrap();
    let seed = tmp.path().join("seed");
    init_with(tmp.path(), &seed, true, &["--store", &db_url]);
    set_config(&seed, "limits", "authenticated_per_second", "0");
    // A second init on the same database refuses, and changes nothing.
    let again = sigil(
        &[
            "init",
            "--data-dir",
            tmp.path().join("again").to_str().unwrap(),
            "--trust-domain",
            "example.org",
            "--store",
            &db_url,
        ],
        tmp.path(),
    );
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds a Sigil store"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    Some(Cluster {
        pg,
        db_url,
        tmp,
        seed,
    })
}

impl Cluster {
    /// A replica's data dir: the config, master key, operator credential and bundle, as a
    /// deployment hands them to every replica.
    fn replica_dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for f in ["sigil.toml", "master.key", "bundle.pem"] {
            std::fs::copy(self.seed.join(f), d.join(f)).unwrap();
        }
        let ok = std::process::Command::new("cp")
            .args(["-a"])
            .arg(self.seed.join("admin"))
            .arg(&d)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        d
    }

    /// `sigil serve` on `dir` (its store: the config's, or `store` when given).
    fn serve(&self, dir: &Path, store: Option<&str>) -> (Proc, String, SocketAddr) {
        let mut args = vec!["serve", "--data-dir", dir.to_str().unwrap()];
        if let Some(s) = store {
            args.extend(["--store", s]);
        }
        let p = Proc::spawn(&args, self.tmp.path(), &[]);
        let mut url = String::new();
        let mut http = None;
        while url.is_empty() || http.is_none() {
            let l = p.wait_for(" listening on ");
            if let Some(u) = l.strip_prefix("sigil broker listening on ") {
                url = u.to_owned();
            }
            if let Some(h) = l.strip_prefix("sigil http listening on https://") {
                http = Some(h.parse().unwrap());
            }
        }
        (p, url, http.unwrap())
    }

    fn bundle(&self) -> Vec<u8> {
        std::fs::read(self.seed.join("bundle.pem")).unwrap()
    }
}

async fn ready(http: SocketAddr, bundle: &[u8]) -> u16 {
    https_get(http, "/readyz", bundle)
        .await
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

async fn wait_ready(
    http: SocketAddr,
    bundle: &[u8],
    want: u16,
    within: Duration,
    what: &str,
) -> Duration {
    let started = Instant::now();
    while ready(http, bundle).await != want {
        assert!(
            started.elapsed() < within,
            "{what}: /readyz {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

async fn create_identity(
    adm: &mut pb::admin_client::AdminClient<sigil_sdk::Failover>,
    path: &str,
    ttl: u32,
) {
    adm.create_identity(pb::CreateIdentityRequest {
        spiffe_id: format!("spiffe://example.org/{path}"),
        owner: "team".into(),
        purpose: "replica test".into(),
        entitlements: Some(pb::Entitlements {
            kinds: vec!["x509".into(), "jwt".into()],
            max_ttl_seconds: ttl,
            audiences: vec!["db".into()],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn join_token(
    adm: &mut pb::admin_client::AdminClient<sigil_sdk::Failover>,
    path: &str,
) -> String {
    adm.create_join_token(pb::CreateJoinTokenRequest {
        id_or_spiffe_id: format!("spiffe://example.org/{path}"),
        ttl_seconds: 0,
    })
    .await
    .unwrap()
    .into_inner()
    .token
}

fn quick() -> SourceConfig {
    SourceConfig {
        min_interval: Duration::from_millis(200),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        ..SourceConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_registry_one_revocation_feed_and_one_use_per_join_token() {
    let Some(c) = cluster("replicas_share_one_registry") else {
        return;
    };
    let (a_dir, b_dir) = (c.replica_dir("a"), c.replica_dir("b"));
    let (_a, a_url, _) = c.serve(&a_dir, None);
    let (_b, b_url, b_http) = c.serve(&b_dir, None);
    let bundle = c.bundle();
    wait_ready(b_http, &bundle, 200, Duration::from_secs(10), "B").await;
    let mut adm_a = admin(&a_dir, &a_url);

    // Created through A, and at once a join token made through B (B catches up on the miss:
    // read-your-writes across replicas), attested and issued through B.
    create_identity(&mut adm_a, "svc/api", 600).await;
    let mut adm_b0 = admin(&b_dir, &b_url);
    let token = join_token(&mut adm_b0, "svc/api").await;
    let on_b = WorkloadClient::new(ClientConfig::new(b_url.clone(), bundle.clone())).unwrap();
    let source = Source::start(
        on_b.clone(),
        Arc::new(sigil_sdk::OneTimeEvidence::new(Evidence::JoinToken(
            token.into(),
        ))),
        quick(),
    )
    .await
    .unwrap();
    let verifier = source.verifier();
    let mut adm_b = admin(&b_dir, &b_url);
    let id = adm_b
        .get_identity(pb::GetIdentityRequest {
            id_or_spiffe_id: "spiffe://example.org/svc/api".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(id.owner, "team");

    // 100 tokens issued through B and revoked through A: B's Source and Verifier enforce each.
    let mut delays = Vec::new();
    for _ in 0..100 {
        let jwt = on_b
            .fetch_jwt_svid(&JwtRequest::audience("db"))
            .await
            .unwrap();
        let token = jwt.token.expose_secret().to_owned();
        assert!(verifier.verify_jwt(&token, "db").is_ok());
        let started = Instant::now();
        adm_a
            .revoke_credential(pb::RevokeCredentialRequest {
                credential_id: jwt.jti.clone(),
                reason: "replica test".into(),
            })
            .await
            .unwrap();
        while verifier.verify_jwt(&token, "db").is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "B's verifier learns of A's revocation"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        delays.push(started.elapsed());
        assert!(verifier.verify_jwt(&token, "db").is_err());
    }
    delays.sort();
    let p50 = delays[49];
    let p99 = delays[98];
    eprintln!(
        "revoke through A -> enforced by an SDK on B: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (from the revoke call's start)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        delays[99].as_secs_f64() * 1e3
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?} under 1 s");

    // A join token raced through both replicas: one attestation.
    let token = join_token(&mut adm_a, "svc/api").await;
    let mut racers = Vec::new();
    for i in 0..20 {
        let url = if i % 2 == 0 {
            a_url.clone()
        } else {
            b_url.clone()
        };
        let (bundle, token) = (bundle.clone(), token.clone());
        racers.push(tokio::spawn(async move {
            WorkloadClient::new(ClientConfig::new(url, bundle))
                .unwrap()
                .attest(
                    Evidence::JoinToken(token.into()),
                    SvidOptions::default(),
                    &[],
                )
                .await
                .is_ok()
        }));
    }
    let mut won = 0;
    for r in racers {
        won += usize::from(r.await.unwrap());
    }
    assert_eq!(won, 1, "one attestation per join token across replicas");

    // Backups and the offline verifier work against the database.
    let out = sigil(
        &[
            "audit",
            "verify",
            "--offline",
            "--data-dir",
            a_dir.to_str().unwrap(),
        ],
        c.tmp.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_of_a_replica_under_load_loses_nothing_and_clients_move_on() {
    let Some(c) = cluster("kill_dash_nine_of_a_replica") else {
        return;
    };
    let (a_dir, b_dir) = (c.replica_dir("a"), c.replica_dir("b"));
    let (mut a, a_url, _) = c.serve(&a_dir, None);
    let (_b, b_url, b_http) = c.serve(&b_dir, None);
    let bundle = c.bundle();
    wait_ready(b_http, &bundle, 200, Duration::from_secs(10), "B").await;
    let both = format!("{a_url},{b_url}");

    // A Source with 4 s certificates renewing through A first.
    let mut adm = admin(&a_dir, &both);
    create_identity(&mut adm, "svc/short", 4).await;
    let token = join_token(&mut adm, "svc/short").await;
    let client = WorkloadClient::new(ClientConfig::new(both.clone(), bundle.clone())).unwrap();
    let source = Source::start(
        client,
        Arc::new(sigil_sdk::OneTimeEvidence::new(Evidence::JoinToken(
            token.into(),
        ))),
        quick(),
    )
    .await
    .unwrap();
    let mut events = source.events();
    let bad = Arc::new(AtomicBool::new(false));
    let watch_bad = bad.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if matches!(
                e,
                SourceEvent::RenewalFailed { .. } | SourceEvent::Expired { .. }
            ) {
                eprintln!("source event: {e:?}");
                watch_bad.store(true, Ordering::SeqCst);
            }
        }
    });

    let load = Load::start(&a_dir, &both, false).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = load.count();
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    while load.count() < before + 100 {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "clients issue again through B"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let moved = killed.elapsed();
    // Long enough for the Source to renew twice through B.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let refused = load.refused.lock().unwrap().clone();
    let received = load.stop().await;
    eprintln!(
        "kill -9 of replica A under 64 in flight: issuing again through B {:.0} ms later; {} credentials received, refusals {:?}",
        moved.as_secs_f64() * 1e3,
        received.len(),
        refused
    );
    all_on_record(&b_dir, &b_url, &received).await;
    assert!(
        !bad.load(Ordering::SeqCst),
        "the Source saw no failed renewal and no expired certificate"
    );
    assert!(
        source.x509_svid().is_ok(),
        "the Source holds a valid certificate"
    );
    source.shutdown().await;
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_load_fails_closed_and_replicas_recover_by_themselves() {
    let Some(c) = cluster("a_postgres_restart_under_load") else {
        return;
    };
    let (a_dir, b_dir) = (c.replica_dir("a"), c.replica_dir("b"));
    let (_a, a_url, a_http) = c.serve(&a_dir, None);
    let (_b, b_url, b_http) = c.serve(&b_dir, None);
    let bundle = c.bundle();
    for h in [a_http, b_http] {
        wait_ready(h, &bundle, 200, Duration::from_secs(10), "start").await;
    }
    let both = format!("{a_url},{b_url}");
    let load = Load::start(&a_dir, &both, false).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pg_stopped = Instant::now();
    c.pg.stop().unwrap();
    for h in [a_http, b_http] {
        wait_ready(
            h,
            &bundle,
            503,
            Duration::from_secs(10),
            "not ready without the database",
        )
        .await;
    }
    let down_at = load.count();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        load.count(),
        down_at,
        "nothing issued while the database is down"
    );
    c.pg.start_again().unwrap();
    let back = Instant::now();
    for h in [a_http, b_http] {
        wait_ready(
            h,
            &bundle,
            200,
            Duration::from_secs(30),
            "ready again without a restart",
        )
        .await;
    }
    let ready_after = back.elapsed();
    while load.count() < down_at + 100 {
        assert!(back.elapsed() < Duration::from_secs(30), "issuing again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received = load.stop().await;
    eprintln!(
        "PostgreSQL down {:.1} s under load: both replicas ready {:.2} s after it came back; {} credentials",
        (back - pg_stopped).as_secs_f64(),
        ready_after.as_secs_f64(),
        received.len()
    );
    all_on_record(&a_dir, &a_url, &received).await;
    let v = admin(&b_dir, &b_url)
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.intact, "{}", v.reason);
}

/// A TCP proxy in front of PostgreSQL that can cut every connection through it, and refuse
/// new ones, until healed.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    cuts: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Proxy {
    async fn start(to: u16) -> Proxy {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let cuts = Arc::new(cuts);
        let (c, g) = (cut.clone(), cuts.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let mut cut_rx = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, cut, cuts }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|g| *g += 1);
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_from_the_database_goes_not_ready_and_catches_up_before_it_is_ready_again() {
    let Some(c) = cluster("a_replica_cut_from_the_database") else {
        return;
    };
    let proxy = Proxy::start(c.pg.port()).await;
    let via_proxy = c.db_url.replace(
        &format!(":{}/", c.pg.port()),
        &format!(":{}/", proxy.addr.port()),
    );
    let (a_dir, c_dir) = (c.replica_dir("a"), c.replica_dir("c"));
    let (_a, a_url, a_http) = c.serve(&a_dir, None);
    let (_c, c_url, c_http) = c.serve(&c_dir, Some(&via_proxy));
    let bundle = c.bundle();
    for h in [a_http, c_http] {
        wait_ready(h, &bundle, 200, Duration::from_secs(10), "start").await;
    }
    // A workload that prefers C, with A as the other replica.
    let mut adm_a = admin(&a_dir, &a_url);
    create_identity(&mut adm_a, "svc/w", 600).await;
    let token = join_token(&mut adm_a, "svc/w").await;
    let w = WorkloadClient::new(ClientConfig::new(
        format!("{c_url},{a_url}"),
        bundle.clone(),
    ))
    .unwrap();
    w.attest(
        Evidence::JoinToken(token.into()),
        SvidOptions::default(),
        &[],
    )
    .await
    .unwrap();

    proxy.cut();
    let cut_at = Instant::now();
    let noticed = wait_ready(
        c_http,
        &bundle,
        503,
        Duration::from_secs(15),
        "C not ready once cut",
    )
    .await;
    // The workload moves to A; A keeps serving, and commits what C cannot see yet.
    for _ in 0..5 {
        w.fetch_jwt_svid(&JwtRequest::audience("db"))
            .await
            .expect("served through A");
    }
    create_identity(&mut adm_a, "svc/during-the-cut", 600).await;
    assert_eq!(ready(a_http, &bundle).await, 200);
    // A real outage, not a blip: C stays cut (and not ready) for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ready(c_http, &bundle).await,
        503,
        "still not ready while cut"
    );

    proxy.heal();
    let healed = Instant::now();
    wait_ready(
        c_http,
        &bundle,
        200,
        Duration::from_secs(30),
        "C ready after the cut heals",
    )
    .await;
    let back = healed.elapsed();
    // Ready means caught up: what A committed during the cut is in C's registry already.
    let mut adm_c = admin(&c_dir, &c_url);
    let got = adm_c
        .get_identity(pb::GetIdentityRequest {
            id_or_spiffe_id: "spiffe://example.org/svc/during-the-cut".into(),
        })
        .await;
    assert!(
        got.is_ok(),
        "C caught up before it said it was ready: {got:?}"
    );
    eprintln!(
        "replica cut from PostgreSQL: not ready after {:.2} s; ready (and caught up) {:.2} s after the cut healed (cut for {:.1} s)",
        noticed.as_secs_f64(),
        back.as_secs_f64(),
        (healed - cut_at).as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigil_migrate_moves_an_embedded_store_with_100k_ledger_rows_into_postgres() {
    let Some(c) = cluster("sigil_migrate") else {
        return;
    };
    // An embedded store with 100,000 ledger rows.
    let embedded = c.tmp.path().join("embedded");
    init_at(c.tmp.path(), &embedded, false);
    {
        let cfg = sigil_broker::config::Config::load(&embedded).unwrap();
        let key = sigil_broker::server::load_master_key(&cfg).unwrap();
        let sealer = Arc::new(sigil_broker::seal::Sealer::new(&key));
        let store = sigil_store::open(&cfg.store().unwrap(), sealer, Default::default())
            .await
            .unwrap();
        let now = std::time::SystemTime::now();
        for batch in 0..100 {
            let mut ops = Vec::with_capacity(1000);
            for i in 0..1000u64 {
                let t = now - Duration::from_secs(86_400) + Duration::from_micros(batch * 1000 + i);
                ops.push(sigil_broker::store::Op::AppendLedger(
                    sigil_broker::model::LedgerRecord {
                        credential_id: sigil_pki::ids::to_hex(&sigil_pki::ids::new_serial(t)),
                        kind: sigil_broker::model::CredentialKind::X509,
                        identity_id: "id-bulk".into(),
                        spiffe_id: "spiffe://example.org/bulk".into(),
                        generation: 1,
                        audiences: Vec::new(),
                        scopes: Vec::new(),
                        dns_names: Vec::new(),
                        issued_at: sigil_broker::clock::unix_secs(t),
                        expires_at: sigil_broker::clock::unix_secs(t) + 3600,
                        signing_key_id: "k".into(),
                        attestation: "join_token".into(),
                        source: "127.0.0.1".into(),
                    },
                ));
            }
            store
                .commit(sigil_broker::store::Change {
                    ops,
                    audit: vec![sigil_broker::audit::AuditDraft::new(
                        0,
                        "test",
                        "bulk",
                        "ledger",
                        sigil_broker::audit::Decision::Allow,
                        "populate",
                        "t",
                    )],
                })
                .await
                .unwrap();
        }
        store.close().await;
    }
    c.pg.create_database("migrated").unwrap();
    let target = c.pg.url("migrated");
    let started = Instant::now();
    let out = sigil(
        &[
            "migrate",
            "--from",
            embedded.to_str().unwrap(),
            "--to",
            &target,
        ],
        c.tmp.path(),
    );
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "migrate: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("100001 ledger records") || stdout.contains("ledger records"),
        "{stdout}"
    );
    assert!(stdout.contains("audit log intact"), "{stdout}");
    eprintln!(
        "sigil migrate of 100,000 ledger rows: {:.1} s",
        took.as_secs_f64()
    );
    // A second migrate into the same database refuses.
    let again = sigil(
        &[
            "migrate",
            "--from",
            embedded.to_str().unwrap(),
            "--to",
            &target,
        ],
        c.tmp.path(),
    );
    assert!(!again.status.success(), "a non-empty target is refused");
    // The broker serves from it, with every row and the chain intact.
    let _p = Proc::spawn(
        &[
            "serve",
            "--data-dir",
            embedded.to_str().unwrap(),
            "--store",
            &target,
        ],
        c.tmp.path(),
        &[],
    );
    let url = _p
        .wait_for("sigil broker listening on ")
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    let mut adm = admin(&embedded, &url);
    let v = adm
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.intact, "{}", v.reason);
    assert!(
        v.entries >= 102,
        "the whole chain came along: {}",
        v.entries
    );
}
