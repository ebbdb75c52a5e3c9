//! `sigil bench`: load against a real broker over real TLS, every issuance durable with its
//! audit entry. Prints throughput and latency percentiles and, with `--baseline`, the raw costs
//! measured in the same run (one durable redb commit, one ES256 signature, one CSR check plus
//! leaf signature), so results read as ratios on whatever machine runs them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;
use sigil_proto::v1 as pb;
use sigil_proto::v1::broker_client::BrokerClient;
use sigil_sdk::transport::{self, BrokerTarget, ClientCertSlot};
use sigil_sdk::{ClientConfig, Evidence, SvidOptions, WorkloadClient};
use tonic::transport::Channel;

use crate::cli::Conn;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// JWT-SVID mint over mTLS.
    Jwt,
    /// X.509-SVID from a CSR over mTLS.
    X509,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Jwt => "jwt",
            Scenario::X509 => "x509",
        }
    }
}

/// `sigil bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Start a broker in-process on a temporary data dir (the default when no --broker or
    /// --data-dir is given).
    #[arg(long)]
    pub embedded: bool,
    /// Scenarios to run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "jwt,x509")]
    pub scenario: Vec<Scenario>,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// TLS connections (each a separately attested workload).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Measured time per scenario.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up per scenario.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Also measure the raw costs on this machine in the same run.
    #[arg(long)]
    pub baseline: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// One scenario's figures.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Completed operations per second.
    pub ops_per_s: f64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// p90.
    pub p90_ms: f64,
    /// p99.
    pub p99_ms: f64,
    /// Max.
    pub max_ms: f64,
    /// Completed operations.
    pub ops: u64,
    /// Errors by gRPC code.
    pub errors: BTreeMap<String, u64>,
}

struct Target {
    url: String,
    bundle_pem: Vec<u8>,
    conn: Conn,
    _running: Option<crate::server::RunningBroker>,
    _dir: Option<tempfile::TempDir>,
}

async fn embedded() -> Result<Target> {
    let dir = tempfile::tempdir().context("temp dir")?;
    let data = dir.path().join("data");
    crate::init::init(
        crate::init::InitOptions {
            data_dir: data.clone(),
            trust_domain: "bench.sigil.test".parse().map_err(|e| anyhow!("{e}"))?,
            listen: Some(([127, 0, 0, 1], 0).into()),
            http_listen: Some(None),
            operator: "bench".into(),
            operator_ttl: Duration::from_secs(86400),
            master_key: None,
        },
        &crate::clock::SystemClock,
    )
    .await?;
    let cfg = crate::config::Config::load(&data)?;
    let master = crate::server::load_master_key(&cfg)?;
    let running = crate::server::start(cfg, master, crate::server::StartOptions::default()).await?;
    let url = running.url();
    let bundle_pem = std::fs::read(data.join(crate::config::BUNDLE_FILE))?;
    let conn = Conn {
        data_dir: Some(data),
        broker: Some(url.clone()),
        trust_bundle: None,
        admin_cert: None,
        admin_key: None,
    };
    Ok(Target {
        url,
        bundle_pem,
        conn,
        _running: Some(running),
        _dir: Some(dir),
    })
}

fn external(conn: &Conn) -> Result<Target> {
    let url = match (&conn.broker, &conn.data_dir) {
        (Some(b), _) => b.clone(),
        (None, Some(d)) => crate::cli::broker_url_of(d)?,
        _ => {
            return Err(anyhow!(
                "no broker: pass --embedded, --broker or --data-dir"
            ));
        }
    };
    let bundle_path = conn
        .trust_bundle
        .clone()
        .or_else(|| {
            conn.data_dir
                .as_ref()
                .map(|d| d.join(crate::config::BUNDLE_FILE))
        })
        .ok_or_else(|| anyhow!("no trust bundle: pass --trust-bundle or --data-dir"))?;
    let bundle_pem = std::fs::read(&bundle_path)
        .with_context(|| format!("reading {}", bundle_path.display()))?;
    Ok(Target {
        url,
        bundle_pem,
        conn: conn.clone(),
        _running: None,
        _dir: None,
    })
}

/// Attests `n` workloads of one bench identity and returns an mTLS client for each.
async fn workloads(t: &Target, n: usize) -> Result<Vec<BrokerClient<Channel>>> {
    let probe = WorkloadClient::new(ClientConfig::new(t.url.clone(), t.bundle_pem.clone()))?;
    let td = probe.fetch_bundle().await?.bundle.trust_domain.clone();
    let mut admin = t.conn.connect()?;
    let spiffe_id = format!(
        "spiffe://{td}/bench/{}",
        sigil_pki::ids::to_hex(&sigil_pki::ids::random_bytes::<4>())
    );
    admin
        .create_identity(pb::CreateIdentityRequest {
            spiffe_id: spiffe_id.clone(),
            owner: "sigil bench".into(),
            purpose: "load generation".into(),
            labels: Default::default(),
            selectors: Vec::new(),
            entitlements: Some(pb::Entitlements {
                kinds: vec!["x509".into(), "jwt".into()],
                max_ttl_seconds: 3600,
                audiences: vec!["bench".into()],
                scopes: Vec::new(),
                dns_names: Vec::new(),
            }),
            expires_in_seconds: 86400,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?;
    let target = BrokerTarget::parse(&t.url)?;
    let roots = transport::roots_from_pem(&t.bundle_pem)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let token = admin
            .create_join_token(pb::CreateJoinTokenRequest {
                id_or_spiffe_id: spiffe_id.clone(),
                ttl_seconds: 600,
            })
            .await
            .map_err(sigil_sdk::SdkError::from)?
            .into_inner()
            .token;
        let w = WorkloadClient::new(ClientConfig::new(t.url.clone(), t.bundle_pem.clone()))?;
        let creds = w
            .attest(
                Evidence::JoinToken(token.into()),
                SvidOptions::default(),
                &[],
            )
            .await?;
        let slot = Arc::new(ClientCertSlot::default());
        slot.set(
            creds.svid.cert_chain.clone(),
            creds.svid.private_key_der().expose_secret(),
        )?;
        let tls = transport::client_config(roots.clone(), Some(slot))?;
        out.push(BrokerClient::new(transport::channel(
            &target,
            tls,
            Duration::from_secs(30),
        )?));
    }
    Ok(out)
}

fn csr_pool(n: usize) -> Result<Vec<Vec<u8>>> {
    (0..n)
        .map(|_| Ok(sigil_pki::csr::request_for(&sigil_pki::EcKey::generate()?)?))
        .collect()
}

async fn run_scenario(
    s: Scenario,
    clients: &[BrokerClient<Channel>],
    csrs: &Arc<Vec<Vec<u8>>>,
    a: &BenchArgs,
) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(a.concurrency);
    for i in 0..a.concurrency {
        let mut c = clients[i % clients.len()].clone();
        let (stop, measuring, done, csrs) =
            (stop.clone(), measuring.clone(), done.clone(), csrs.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = i;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let r = match s {
                    Scenario::Jwt => c
                        .mint_jwt_svid(pb::MintJwtSvidRequest {
                            request: Some(pb::JwtRequest {
                                audiences: vec!["bench".into()],
                                scopes: Vec::new(),
                                ttl_seconds: 300,
                            }),
                        })
                        .await
                        .map(|_| ()),
                    Scenario::X509 => c
                        .mint_x509_svid(pb::MintX509SvidRequest {
                            csr: csrs[n % csrs.len()].clone(),
                            ttl_seconds: 600,
                            dns_names: Vec::new(),
                        })
                        .await
                        .map(|_| ()),
                };
                n += 1;
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match r {
                    Ok(()) => {
                        if let Some(h) = h.as_mut() {
                            let _ = h.record(t0.elapsed().as_micros() as u64);
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => *errors.entry(format!("{:?}", e.code())).or_default() += 1,
                }
            }
            (h, errors)
        }));
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(format!("{}: warming up", s.name()));
    tokio::time::sleep(a.warmup).await;
    measuring.store(true, Ordering::SeqCst);
    let started = Instant::now();
    while started.elapsed() < a.duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n = done.load(Ordering::Relaxed);
        bar.set_message(format!(
            "{}: {} ops, {:.0}/s",
            s.name(),
            n,
            n as f64 / started.elapsed().as_secs_f64()
        ));
        bar.tick();
    }
    measuring.store(false, Ordering::SeqCst);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    bar.finish_and_clear();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
    let mut errors = BTreeMap::new();
    for t in tasks {
        if let Ok((h, e)) = t.await {
            if let (Some(all), Some(h)) = (hist.as_mut(), h) {
                let _ = all.add(h);
            }
            for (k, v) in e {
                *errors.entry(k).or_default() += v;
            }
        }
    }
    let ops = done.load(Ordering::Relaxed);
    let q = |p: f64| {
        hist.as_ref()
            .map(|h| h.value_at_quantile(p) as f64 / 1000.0)
            .unwrap_or(0.0)
    };
    Figures {
        ops_per_s: ops as f64 / elapsed.as_secs_f64(),
        p50_ms: q(0.50),
        p90_ms: q(0.90),
        p99_ms: q(0.99),
        max_ms: hist
            .as_ref()
            .map(|h| h.max() as f64 / 1000.0)
            .unwrap_or(0.0),
        ops,
        errors,
    }
}

/// Raw costs on this machine, one core each.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// Durable single-insert redb commits per second (one fsync each).
    pub redb_commit_per_s: f64,
    /// ES256 signatures per second.
    pub es256_sign_per_s: f64,
    /// CSR signature checks + leaf signatures per second.
    pub csr_issue_per_s: f64,
}

fn rate(n: u32, f: impl FnMut(u32) -> Result<()>) -> Result<f64> {
    let mut f = f;
    let t = Instant::now();
    for i in 0..n {
        f(i)?;
    }
    Ok(f64::from(n) / t.elapsed().as_secs_f64())
}

/// Measures [`Baseline`].
pub fn baseline() -> Result<Baseline> {
    let dir = tempfile::tempdir()?;
    let db = redb::Database::create(dir.path().join("b.redb"))?;
    const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
    let payload = [7u8; 300];
    let redb_commit_per_s = rate(300, |i| {
        let mut tx = db.begin_write()?;
        tx.set_durability(redb::Durability::Immediate)?;
        tx.open_table(T)?.insert(u64::from(i), payload.as_slice())?;
        tx.commit()?;
        Ok(())
    })?;
    let key = sigil_pki::EcKey::generate()?;
    let es256_sign_per_s = rate(3000, |_| {
        key.sign_es256(b"header.payload")?;
        Ok(())
    })?;
    let td: sigil_pki::TrustDomain = "bench.sigil.test".parse().map_err(|e| anyhow!("{e}"))?;
    let now = SystemTime::now();
    let root = sigil_pki::CertificateAuthority::new_self_signed(
        sigil_pki::CaRole::Root,
        &td,
        sigil_pki::EcKey::generate()?,
        now,
        Duration::from_secs(86400),
    )?;
    let int = root.new_intermediate(
        &td,
        sigil_pki::EcKey::generate()?,
        now,
        Duration::from_secs(86400),
    )?;
    let csrs = csr_pool(64)?;
    let id = td.id_with_path("/bench").map_err(|e| anyhow!("{e}"))?;
    let csr_issue_per_s = rate(1500, |i| {
        let csr = sigil_pki::VerifiedCsr::from_der(&csrs[i as usize % csrs.len()])?;
        int.mint_leaf(
            &csr,
            &sigil_pki::LeafSpec {
                spiffe_id: &id,
                dns_names: &[],
                ip_addresses: &[],
                usage: sigil_pki::LeafUsage::ServerAndClient,
                now,
                ttl: Duration::from_secs(600),
                backdate: Duration::from_secs(30),
                serial: &sigil_pki::ids::new_serial(now),
            },
        )?;
        Ok(())
    })?;
    Ok(Baseline {
        redb_commit_per_s,
        es256_sign_per_s,
        csr_issue_per_s,
    })
}

fn rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs `sigil bench`.
pub async fn run(a: BenchArgs) -> Result<()> {
    let use_embedded = a.embedded || (a.conn.broker.is_none() && a.conn.data_dir.is_none());
    let target = if use_embedded {
        embedded().await?
    } else {
        external(&a.conn)?
    };
    let clients = workloads(&target, a.connections.max(1)).await?;
    let csrs = Arc::new(csr_pool(256)?);
    let mut results = BTreeMap::new();
    let mut scenarios = a.scenario.clone();
    scenarios.sort();
    scenarios.dedup();
    for s in scenarios {
        let f = run_scenario(s, &clients, &csrs, &a).await;
        results.insert(s.name(), f);
    }
    let base = if a.baseline {
        Some(tokio::task::spawn_blocking(baseline).await??)
    } else {
        None
    };
    let rss = if use_embedded { rss_mb() } else { None };

    if a.json {
        let scen: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(k, f)| {
                (
                    (*k).to_owned(),
                    json!({"ops_per_s": f.ops_per_s.round(), "p50_ms": f.p50_ms, "p90_ms": f.p90_ms, "p99_ms": f.p99_ms, "max_ms": f.max_ms,
                           "ops": f.ops, "errors": f.errors.values().sum::<u64>(), "errors_by_code": f.errors}),
                )
            })
            .collect();
        let mut out = json!({"scenarios": scen, "concurrency": a.concurrency, "connections": a.connections, "embedded": use_embedded});
        if let Some(b) = &base {
            out["baseline"] = json!({"redb_commit_per_s": b.redb_commit_per_s.round(), "es256_sign_per_s": b.es256_sign_per_s.round(), "csr_issue_per_s": b.csr_issue_per_s.round()});
        }
        if let Some(r) = rss {
            out["process_rss_mb"] = json!(r.round());
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} in flight over {} TLS connections, {} measured per scenario ({})",
        a.concurrency,
        a.connections,
        crate::config::dur::format(a.duration),
        if use_embedded {
            "embedded broker: client and broker share this process"
        } else {
            target.url.as_str()
        }
    );
    println!(
        "{:<9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "scenario", "ops/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"
    );
    for (k, f) in &results {
        let errs: u64 = f.errors.values().sum();
        println!(
            "{:<9} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8}",
            k, f.ops_per_s, f.p50_ms, f.p90_ms, f.p99_ms, f.max_ms, errs
        );
        for (code, n) in &f.errors {
            println!("          {n} × {code}");
        }
    }
    if let Some(r) = rss {
        println!("process RSS: {r:.0} MB (broker and load generator)");
    }
    if let Some(b) = base {
        println!();
        println!("baseline, measured now on one core each:");
        println!(
            "  durable redb commit (one fsync)   {:>10.0}/s",
            b.redb_commit_per_s
        );
        println!(
            "  ES256 sign                        {:>10.0}/s",
            b.es256_sign_per_s
        );
        println!(
            "  CSR check + leaf sign             {:>10.0}/s",
            b.csr_issue_per_s
        );
        if let Some(f) = results.get("jwt") {
            println!(
                "  jwt mint rate = {:.1}x the single-commit rate, {:.0}% of raw ES256 signing",
                f.ops_per_s / b.redb_commit_per_s,
                100.0 * f.ops_per_s / b.es256_sign_per_s
            );
        }
        if let Some(f) = results.get("x509") {
            println!(
                "  x509 mint rate = {:.1}x the single-commit rate, {:.0}% of raw CSR check + sign",
                f.ops_per_s / b.redb_commit_per_s,
                100.0 * f.ops_per_s / b.csr_issue_per_s
            );
        }
    }
    Ok(())
}
