//! `sigil bench --store postgres`: the replica figures, on a private PostgreSQL server the
//! bench starts — issuance on PostgreSQL beside the embedded store (by turns), a revocation
//! reaching watchers spread over two replicas, the failover an SDK sees when its replica is
//! killed, and a replica's start-to-ready on a populated database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use sigil_proto::v1 as pb;
use sigil_sdk::{ClientConfig, Evidence, JwtRequest, SvidOptions, WorkloadClient};

use crate::driver::Figures;
use crate::scenarios::{bench_identity, run_revoke};
use crate::target::{External, Target, embedded, embedded_on, spawn_broker};
use crate::{BenchArgs, Scenario, alternate};

/// What an SDK saw when its replica was killed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Failover {
    /// Longest time without a successful call around the kill, ms.
    pub(crate) gap_ms: f64,
    /// Calls that failed.
    pub(crate) failed: u64,
    /// Calls that succeeded.
    pub(crate) ok: u64,
    /// Why calls failed, by message.
    pub(crate) why: std::collections::BTreeMap<String, u64>,
}

/// Everything the replica run measured.
#[derive(Debug)]
pub(crate) struct Replicas {
    pub(crate) postgres: Vec<(String, Figures)>,
    pub(crate) redb: Vec<(String, Figures)>,
    pub(crate) revoke: Option<Figures>,
    pub(crate) failover: Failover,
    /// Ledger rows in the database and how long a new replica took to be ready on it.
    pub(crate) start: Option<(u64, Duration)>,
}

/// Another replica on the same database as `seed`: its config (the store URL) and master key.
async fn replica(seed: &Target) -> Result<Target> {
    let (_, seed_data, master) = seed
        .own
        .as_ref()
        .ok_or_else(|| anyhow!("the first replica has no data dir"))?;
    let dir = tempfile::tempdir().context("temp dir")?;
    let data = dir.path().join("data");
    std::fs::create_dir(&data)?;
    for f in [
        sigil_broker::config::CONFIG_FILE,
        sigil_broker::config::BUNDLE_FILE,
    ] {
        std::fs::copy(seed_data.join(f), data.join(f))?;
    }
    let (child, url, _) = spawn_broker(&data, master).await?;
    Ok(Target {
        url: url.clone(),
        bundle_pem: seed.bundle_pem.clone(),
        conn: External {
            url,
            ..seed.conn.clone()
        },
        broker_pid: child.id(),
        child: Some(child),
        own: Some((dir, data, master.clone())),
    })
}

/// Runs the replica figures.
pub(crate) async fn run(a: &mut BenchArgs) -> Result<Replicas> {
    let pg = sigil_broker::store::local::LocalPostgres::start()
        .map_err(|e| anyhow!("--store postgres starts a private PostgreSQL server: {e}"))?;
    pg.create_database("sigil")
        .map_err(|e| anyhow!("creating the database: {e}"))?;
    let url = pg.url("sigil");
    let a_rep = embedded_on(Some(&url)).await?;
    let mut b_rep = replica(&a_rep).await?;
    let spiffe_id = bench_identity(&a_rep).await?;

    // Issuance on PostgreSQL beside the embedded store, by turns.
    let redb = embedded().await?;
    let redb_id = bench_identity(&redb).await?;
    let issuing: Vec<Scenario> = a
        .scenario
        .iter()
        .copied()
        .filter(|s| matches!(s, Scenario::Jwt | Scenario::X509))
        .collect();
    let issuing = if issuing.is_empty() {
        vec![Scenario::Jwt, Scenario::X509]
    } else {
        issuing
    };
    let (postgres, redb_figs) =
        alternate((&a_rep, &spiffe_id), (&redb, &redb_id), &issuing, a).await?;
    drop(redb);

    // A revocation through A reaching watchers spread over A and B.
    let watchers = a.watchers.first().copied().unwrap_or(1000);
    let revoke = Some(
        run_revoke(
            &a_rep,
            &[&a_rep, &b_rep],
            &spiffe_id,
            watchers,
            a.revocations.max(1),
            a_rep.broker_pid,
        )
        .await?,
    );

    // Failover seen by an SDK: 16 calls in flight through "A,B"; A is killed.
    let failover = failover(&a_rep, &b_rep, &spiffe_id, a_rep.broker_pid).await?;
    let mut a_rep = a_rep;
    if let Some(c) = a_rep.child.as_mut() {
        let _ = c.wait().await;
    }

    // A new replica's start-to-ready on a populated database.
    let rows = a.populate.unwrap_or(if a.baseline { 1_000_000 } else { 0 });
    let start = if rows > 0 {
        populate(&url, &a_rep, rows).await?;
        let (_, seed_data, master) = a_rep
            .own
            .as_ref()
            .ok_or_else(|| anyhow!("no seed data dir"))?;
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        std::fs::copy(
            seed_data.join(sigil_broker::config::CONFIG_FILE),
            data.join(sigil_broker::config::CONFIG_FILE),
        )?;
        let (mut child, _, ready) = spawn_broker(&data, master).await?;
        let _ = child.kill().await;
        Some((rows, ready))
    } else {
        None
    };
    if let Some(c) = b_rep.child.as_mut() {
        let _ = c.kill().await;
    }
    Ok(Replicas {
        postgres,
        redb: redb_figs,
        revoke,
        failover,
        start,
    })
}

async fn failover(
    a_rep: &Target,
    b_rep: &Target,
    spiffe_id: &str,
    a_pid: Option<u32>,
) -> Result<Failover> {
    let mut admin = a_rep.conn.connect()?;
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            id_or_spiffe_id: spiffe_id.to_owned(),
            ttl_seconds: 600,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner()
        .token;
    let both = format!("{},{}", a_rep.url, b_rep.url);
    let w = WorkloadClient::new(ClientConfig::new(both, a_rep.bundle_pem.clone()))?;
    w.attest(
        Evidence::JoinToken(token.into()),
        SvidOptions::default(),
        &[],
    )
    .await?;
    let started = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let times = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let why = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u64,
    >::new()));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (w, stop, ok, failed, times, why) = (
            w.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            times.clone(),
            why.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match w.fetch_jwt_svid(&JwtRequest::audience("bench")).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut t) = times.lock() {
                            t.push(started.elapsed());
                        }
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut m) = why.lock() {
                            *m.entry(e.to_string().chars().take(160).collect())
                                .or_default() += 1;
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = started.elapsed();
    if let Some(pid) = a_pid {
        let _ = tokio::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let mut t = times.lock().map(|t| t.clone()).unwrap_or_default();
    t.sort();
    // The longest stretch without a success, among those that began before the kill ended.
    let before = t
        .iter()
        .rev()
        .find(|d| **d <= killed)
        .copied()
        .unwrap_or(killed);
    let after = t
        .iter()
        .find(|d| **d > killed)
        .copied()
        .unwrap_or(started.elapsed());
    Ok(Failover {
        gap_ms: (after - before).as_secs_f64() * 1e3,
        failed: failed.load(Ordering::Relaxed),
        ok: ok.load(Ordering::Relaxed),
        why: why.lock().map(|m| m.clone()).unwrap_or_default(),
    })
}

/// Fills the database with `rows` ledger rows (credentials issued over the past month, long
/// expired) through the store and writer the broker uses.
async fn populate(url: &str, seed: &Target, rows: u64) -> Result<()> {
    let (_, _, master) = seed.own.as_ref().ok_or_else(|| anyhow!("no master key"))?;
    let sealer = Arc::new(sigil_broker::seal::Sealer::new(master));
    let store = sigil_broker::store::open(
        &sigil_broker::store::StoreConfig::postgres(url, None)?,
        sealer,
        Default::default(),
    )
    .await?;
    let now = std::time::SystemTime::now() - Duration::from_secs(30 * 86400);
    let per = 5000u64;
    let mut done = 0u64;
    while done < rows {
        let n = per.min(rows - done);
        let mut ops = Vec::with_capacity(n as usize);
        for i in 0..n {
            let t = now + Duration::from_micros((done + i) * 2000);
            let serial = sigil_pki::ids::new_serial(t);
            ops.push(sigil_broker::store::Op::AppendLedger(
                sigil_broker::model::LedgerRecord {
                    credential_id: sigil_pki::ids::to_hex(&serial),
                    kind: sigil_broker::model::CredentialKind::X509,
                    identity_id: "id-bench-populate".into(),
                    spiffe_id: "spiffe://bench.sigil.test/populate".into(),
                    generation: 1,
                    audiences: Vec::new(),
                    scopes: Vec::new(),
                    dns_names: Vec::new(),
                    issued_at: sigil_broker::clock::unix_secs(t),
                    expires_at: sigil_broker::clock::unix_secs(t) + 3600,
                    signing_key_id: "populate".into(),
                    attestation: "join_token".into(),
                    source: "127.0.0.1".into(),
                },
            ));
        }
        store
            .commit(sigil_broker::store::Change {
                ops,
                audit: vec![sigil_broker::audit::AuditDraft::new(
                    sigil_broker::clock::unix_nanos(std::time::SystemTime::now()),
                    "sigil-bench",
                    "bench.populate",
                    "ledger",
                    sigil_broker::audit::Decision::Allow,
                    "populate",
                    "bench",
                )],
            })
            .await?;
        done += n;
    }
    store.close().await;
    Ok(())
}

/// Prints the replica figures (a table, or one JSON object).
pub(crate) fn report(r: &Replicas, json: bool) -> Result<()> {
    let fig = |f: &Figures| {
        serde_json::json!({
            "ops_per_s": f.ops_per_s, "p50_ms": f.p50_ms, "p99_ms": f.p99_ms,
            "errors": f.errors, "broker_cores": f.broker_cores,
        })
    };
    let ratio = |name: &str| {
        let pg = r.postgres.iter().find(|(n, _)| n == name)?;
        let rd = r.redb.iter().find(|(n, _)| n == name)?;
        Some(pg.1.ops_per_s / rd.1.ops_per_s)
    };
    if json {
        let out = serde_json::json!({
            "postgres": r.postgres.iter().map(|(n, f)| (n.clone(), fig(f))).collect::<serde_json::Map<_, _>>(),
            "redb": r.redb.iter().map(|(n, f)| (n.clone(), fig(f))).collect::<serde_json::Map<_, _>>(),
            "postgres_vs_redb": {"jwt": ratio("jwt"), "x509": ratio("x509")},
            "revoke_two_replicas": r.revoke.as_ref().map(|f| serde_json::json!({
                "watchers": f.watchers,
                "from_start_ms": f.from_start_ms.map(|(p50, p99, max)| serde_json::json!({"p50": p50, "p99": p99, "max": max})),
            })),
            "failover": {"gap_ms": r.failover.gap_ms, "failed": r.failover.failed, "ok": r.failover.ok, "why": r.failover.why},
            "start_to_ready": r.start.map(|(rows, d)| serde_json::json!({"ledger_rows": rows, "seconds": d.as_secs_f64()})),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("sigil bench --store postgres (a private PostgreSQL on this machine; two replicas)");
    println!(
        "{:<10} {:>12} {:>9} {:>9} {:>12} {:>9} {:>9} {:>8}",
        "scenario", "postgres/s", "p50 ms", "p99 ms", "redb/s", "p50 ms", "p99 ms", "pg/redb"
    );
    for (name, f) in &r.postgres {
        let Some((_, e)) = r.redb.iter().find(|(n, _)| n == name) else {
            continue;
        };
        println!(
            "{:<10} {:>12.0} {:>9.2} {:>9.2} {:>12.0} {:>9.2} {:>9.2} {:>7.0}%",
            name,
            f.ops_per_s,
            f.p50_ms,
            f.p99_ms,
            e.ops_per_s,
            e.p50_ms,
            e.p99_ms,
            100.0 * f.ops_per_s / e.ops_per_s
        );
    }
    if let Some(f) = &r.revoke
        && let Some((p50, p99, max)) = f.from_start_ms
    {
        println!(
            "revocation through replica A to {} watchers spread over A and B: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms from the revoke call's start",
            f.watchers
        );
    }
    println!(
        "replica A killed under 16 SDK calls in flight: longest gap without a success {:.0} ms; {} calls failed, {} succeeded",
        r.failover.gap_ms, r.failover.failed, r.failover.ok
    );
    for (why, n) in &r.failover.why {
        println!("  {n} failed: {why}");
    }
    if let Some((rows, d)) = r.start {
        println!(
            "a new replica on a database with {rows} ledger rows: ready in {:.2} s",
            d.as_secs_f64()
        );
    }
    Ok(())
}
