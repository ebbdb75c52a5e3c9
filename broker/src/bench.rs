//! `sigil bench`: load against a real broker over real TLS, every issuance durable with its
//! audit entry. Prints throughput and latency percentiles, the broker's CPU and memory and,
//! with `--baseline`, the raw costs measured in the same run (one durable redb commit, one
//! ES256 signature, one CSR check plus leaf signature), so results read as ratios on whatever
//! machine runs them.
//!
//! `--embedded` (the default) runs the broker as a child process on a temporary data dir, so
//! its CPU and memory are measured apart from the load generator's (both share the machine).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;
use sigil_proto::v1 as pb;
use sigil_proto::v1::broker_client::BrokerClient;
use sigil_sdk::transport::{self, BrokerTarget, ClientCertSlot};
use sigil_sdk::{ClientConfig, Evidence, SvidOptions, WorkloadClient};
use tokio::io::AsyncBufReadExt;
use tonic::transport::Channel;

use crate::cli::Conn;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// JWT-SVID mint over mTLS.
    Jwt,
    /// X.509-SVID from a CSR over mTLS.
    X509,
    /// Revocation reaching N watch streams.
    Revoke,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Jwt => "jwt",
            Scenario::X509 => "x509",
            Scenario::Revoke => "revoke",
        }
    }
}

/// `sigil bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Start a broker (a child process on a temporary data dir); the default when no --broker
    /// or --data-dir is given.
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
    /// Watch streams for the revoke scenario (comma-separated: each count is a run).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub watchers: Vec<usize>,
    /// Revocations per revoke run.
    #[arg(long, default_value_t = 20)]
    pub revocations: usize,
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
#[derive(Debug, Clone, Default)]
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
    /// Broker CPU over the measured window, in cores (when the broker is a local process).
    pub broker_cores: Option<f64>,
    /// Broker resident memory after the run, MB.
    pub broker_rss_mb: Option<f64>,
    /// Revoke runs: watchers connected.
    pub watchers: usize,
    /// Revoke runs: p50/p99/max measured from the revoke call's start (ms).
    pub from_start_ms: Option<(f64, f64, f64)>,
}

struct Target {
    url: String,
    bundle_pem: Vec<u8>,
    conn: Conn,
    broker_pid: Option<u32>,
    _child: Option<tokio::process::Child>,
    _dir: Option<tempfile::TempDir>,
}

/// Initializes a temporary data dir and starts `sigil serve` on it as a child process.
async fn embedded() -> Result<Target> {
    let dir = tempfile::tempdir().context("temp dir")?;
    let data = dir.path().join("data");
    let master = crate::seal::MasterKey::generate();
    crate::init::init(
        crate::init::InitOptions {
            data_dir: data.clone(),
            trust_domain: "bench.sigil.test".parse().map_err(|e| anyhow!("{e}"))?,
            listen: Some(([127, 0, 0, 1], 0).into()),
            http_listen: Some(None),
            operator: "bench".into(),
            operator_ttl: Duration::from_secs(86400),
            master_key: Some(master.clone()),
        },
        &crate::clock::SystemClock,
    )
    .await?;
    let exe = std::env::current_exe().context("locating the sigil binary")?;
    let mut child = tokio::process::Command::new(exe)
        .args(["serve", "--data-dir"])
        .arg(&data)
        .env(
            crate::seal::MASTER_KEY_ENV,
            master.to_base64().expose_secret(),
        )
        .env("SIGIL_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the broker process")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from the broker"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if let Some(u) = l.strip_prefix("sigil broker listening on ") {
                return Some(u.to_owned());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .ok_or_else(|| anyhow!("the broker process did not start"))?;
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
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
        broker_pid: child.id(),
        _child: Some(child),
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
        broker_pid: None,
        _child: None,
        _dir: None,
    })
}

/// Resident memory of a process, MB.
fn rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}

/// The bench identity: x509 + jwt, audience `bench`.
async fn bench_identity(t: &Target) -> Result<String> {
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
                ..Default::default()
            }),
            expires_in_seconds: 86400,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?;
    Ok(spiffe_id)
}

/// Attests `n` workloads of the bench identity and returns an mTLS client for each.
async fn workloads(t: &Target, spiffe_id: &str, n: usize) -> Result<Vec<BrokerClient<Channel>>> {
    let mut admin = t.conn.connect()?;
    let target = BrokerTarget::parse(&t.url)?;
    let roots = transport::roots_from_pem(&t.bundle_pem)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let token = admin
            .create_join_token(pb::CreateJoinTokenRequest {
                id_or_spiffe_id: spiffe_id.to_owned(),
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

fn histogram() -> Option<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).ok()
}

fn quantiles(h: &Option<Histogram<u64>>, f: &mut Figures) {
    let q = |p: f64| {
        h.as_ref()
            .map(|h| h.value_at_quantile(p) as f64 / 1000.0)
            .unwrap_or(0.0)
    };
    f.p50_ms = q(0.50);
    f.p90_ms = q(0.90);
    f.p99_ms = q(0.99);
    f.max_ms = h.as_ref().map(|h| h.max() as f64 / 1000.0).unwrap_or(0.0);
}

async fn run_scenario(
    s: Scenario,
    clients: &[BrokerClient<Channel>],
    csrs: &Arc<Vec<Vec<u8>>>,
    a: &BenchArgs,
    pid: Option<u32>,
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
            let mut h = histogram();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = i;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let r = match s {
                    Scenario::X509 => c
                        .mint_x509_svid(pb::MintX509SvidRequest {
                            csr: csrs[n % csrs.len()].clone(),
                            ttl_seconds: 600,
                            dns_names: Vec::new(),
                        })
                        .await
                        .map(|_| ()),
                    _ => c
                        .mint_jwt_svid(pb::MintJwtSvidRequest {
                            request: Some(pb::JwtRequest {
                                audiences: vec!["bench".into()],
                                scopes: Vec::new(),
                                ttl_seconds: 300,
                            }),
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
    let cpu0 = pid.and_then(cpu_secs);
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
    let cpu1 = pid.and_then(cpu_secs);
    stop.store(true, Ordering::SeqCst);
    bar.finish_and_clear();
    let mut hist = histogram();
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
    let mut f = Figures {
        ops_per_s: ops as f64 / elapsed.as_secs_f64(),
        ops,
        errors,
        broker_cores: cpu0.zip(cpu1).map(|(a, b)| (b - a) / elapsed.as_secs_f64()),
        broker_rss_mb: pid.and_then(rss_mb),
        ..Figures::default()
    };
    quantiles(&hist, &mut f);
    f
}

/// Opens `n` watch streams (spread over connections of at most 400 streams each), revokes
/// `revocations` credentials one after another, and measures the delay from each revoke call's
/// return to each watcher receiving it.
async fn run_revoke(
    t: &Target,
    spiffe_id: &str,
    n: usize,
    revocations: usize,
    pid: Option<u32>,
) -> Result<Figures> {
    let target = BrokerTarget::parse(&t.url)?;
    let roots = transport::roots_from_pem(&t.bundle_pem)?;
    let per_conn = 400;
    let conns: Vec<BrokerClient<Channel>> = (0..n.div_ceil(per_conn))
        .map(|_| {
            Ok(BrokerClient::new(transport::channel(
                &target,
                transport::client_config(roots.clone(), None)?,
                Duration::from_secs(60),
            )?))
        })
        .collect::<Result<_, sigil_sdk::SdkError>>()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_message("opening watch streams");
    let mut watchers = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = conns[i / per_conn].clone();
        let tx = tx.clone();
        let ready = ready.clone();
        watchers.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(pb::WatchRequest { since_sequence: 0 });
            req.set_timeout(Duration::from_secs(3600));
            let Ok(resp) = c.watch(req).await else { return };
            let mut s = resp.into_inner();
            let mut announced = false;
            while let Ok(Some(ev)) = s.message().await {
                if let Some(pb::watch_event::Kind::Revocations(r)) = ev.kind {
                    if r.snapshot && !announced {
                        announced = true;
                        ready.add_permits(1);
                        continue;
                    }
                    let at = Instant::now();
                    for c in r.credentials {
                        let _ = tx.send((c.credential_id, at));
                    }
                }
            }
        }));
        bar.inc(1);
    }
    drop(tx);
    let connected =
        match tokio::time::timeout(Duration::from_secs(120), ready.acquire_many(n as u32)).await {
            Ok(Ok(p)) => {
                p.forget();
                n
            }
            _ => ready.available_permits(),
        };
    bar.finish_and_clear();
    if connected < n {
        bail!("only {connected} of {n} watch streams came up within 2 minutes");
    }

    // The credentials to revoke, minted up front.
    let clients = workloads(t, spiffe_id, 1).await?;
    let mut c = clients[0].clone();
    let mut jtis = Vec::with_capacity(revocations);
    for _ in 0..revocations {
        let r = c
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                request: Some(pb::JwtRequest {
                    audiences: vec!["bench".into()],
                    scopes: Vec::new(),
                    ttl_seconds: 300,
                }),
            })
            .await?;
        jtis.push(r.into_inner().svid.map(|s| s.jti).unwrap_or_default());
    }
    let mut admin = t.conn.connect()?;
    let mut returned: HashMap<String, (Instant, Instant)> = HashMap::new();
    let mut hist = histogram();
    let mut hist_start = histogram();
    let mut deliveries = 0u64;
    for jti in &jtis {
        let started = Instant::now();
        admin
            .revoke_credential(pb::RevokeCredentialRequest {
                credential_id: jti.clone(),
                reason: "bench".into(),
            })
            .await
            .map_err(sigil_sdk::SdkError::from)?;
        returned.insert(jti.clone(), (started, Instant::now()));
        // Collect this revocation's deliveries before the next one.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = 0;
        while got < n && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                Ok(Some((id, at))) => {
                    if let Some((s, r)) = returned.get(&id) {
                        // Watchers often hear before the caller does: the broker publishes as
                        // soon as the commit is durable, before replying.
                        let d = at.saturating_duration_since(*r);
                        if let Some(h) = hist.as_mut() {
                            let _ = h.record(d.as_micros().max(1) as u64);
                        }
                        if let Some(h) = hist_start.as_mut() {
                            let _ = h
                                .record(at.saturating_duration_since(*s).as_micros().max(1) as u64);
                        }
                        deliveries += 1;
                        if &id == jti {
                            got += 1;
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {}
            }
        }
    }
    let mut f = Figures {
        ops: deliveries,
        watchers: connected,
        broker_rss_mb: pid.and_then(rss_mb),
        ..Figures::default()
    };
    let expected = (n * revocations) as u64;
    if deliveries < expected {
        f.errors
            .insert("not delivered within 10s".into(), expected - deliveries);
    }
    quantiles(&hist, &mut f);
    f.from_start_ms = hist_start.as_ref().map(|h| {
        (
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
        )
    });
    for w in watchers {
        w.abort();
    }
    Ok(f)
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

fn figures_json(f: &Figures) -> serde_json::Value {
    json!({
        "ops_per_s": f.ops_per_s.round(), "p50_ms": f.p50_ms, "p90_ms": f.p90_ms, "p99_ms": f.p99_ms, "max_ms": f.max_ms,
        "ops": f.ops, "errors": f.errors.values().sum::<u64>(), "errors_by_code": f.errors,
        "broker_cores": f.broker_cores, "broker_rss_mb": f.broker_rss_mb.map(f64::round),
        "watchers": (f.watchers > 0).then_some(f.watchers),
        "from_call_start_ms": f.from_start_ms.map(|(a, b, c)| json!({"p50": a, "p99": b, "max": c})),
    })
}

/// Runs `sigil bench`.
pub async fn run(a: BenchArgs) -> Result<()> {
    let use_embedded = a.embedded || (a.conn.broker.is_none() && a.conn.data_dir.is_none());
    let target = if use_embedded {
        embedded().await?
    } else {
        external(&a.conn)?
    };
    let pid = target.broker_pid;
    let spiffe_id = bench_identity(&target).await?;
    let mut scenarios = a.scenario.clone();
    scenarios.sort();
    scenarios.dedup();
    let mut results: Vec<(String, Figures)> = Vec::new();
    let issuance: Vec<Scenario> = scenarios
        .iter()
        .copied()
        .filter(|s| *s != Scenario::Revoke)
        .collect();
    if !issuance.is_empty() {
        let clients = workloads(&target, &spiffe_id, a.connections.max(1)).await?;
        let csrs = Arc::new(csr_pool(256)?);
        for s in issuance {
            results.push((
                s.name().to_owned(),
                run_scenario(s, &clients, &csrs, &a, pid).await,
            ));
        }
    }
    if scenarios.contains(&Scenario::Revoke) {
        for n in &a.watchers {
            let f = run_revoke(&target, &spiffe_id, *n, a.revocations.max(1), pid).await?;
            results.push((format!("revoke@{n}"), f));
        }
    }
    let base = if a.baseline {
        Some(tokio::task::spawn_blocking(baseline).await??)
    } else {
        None
    };

    if a.json {
        let scen: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(k, f)| (k.clone(), figures_json(f)))
            .collect();
        let mut out = json!({"scenarios": scen, "concurrency": a.concurrency, "connections": a.connections, "embedded": use_embedded});
        if let Some(b) = &base {
            out["baseline"] = json!({"redb_commit_per_s": b.redb_commit_per_s.round(), "es256_sign_per_s": b.es256_sign_per_s.round(), "csr_issue_per_s": b.csr_issue_per_s.round()});
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let place = if use_embedded {
        "a broker process started for this run".to_owned()
    } else {
        target.url.clone()
    };
    println!(
        "against {place}; issuance: {} in flight over {} TLS connections, {} measured",
        a.concurrency,
        a.connections,
        crate::config::dur::format(a.duration)
    );
    println!(
        "{:<14} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>12} {:>11}",
        "scenario",
        "ops/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "broker cpu",
        "broker rss"
    );
    for (k, f) in &results {
        let errs: u64 = f.errors.values().sum();
        let cpu = f
            .broker_cores
            .map(|c| format!("{c:.2} cores"))
            .unwrap_or_else(|| "-".into());
        let rss = f
            .broker_rss_mb
            .map(|r| format!("{r:.0} MB"))
            .unwrap_or_else(|| "-".into());
        let rate = if f.watchers > 0 {
            format!("{} deliv.", f.ops)
        } else {
            format!("{:.0}", f.ops_per_s)
        };
        println!(
            "{:<14} {:>10} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>12} {:>11}",
            k, rate, f.p50_ms, f.p90_ms, f.p99_ms, f.max_ms, errs, cpu, rss
        );
        for (code, n) in &f.errors {
            println!("               {n} × {code}");
        }
    }
    if results.iter().any(|(_, f)| f.watchers > 0) {
        println!(
            "revoke@N: latency from the revoke call's return to each of N watch streams receiving it"
        );
        println!(
            "          (watchers usually hear before the caller: the broker publishes once the commit is durable)"
        );
        for (k, f) in results.iter().filter(|(_, f)| f.watchers > 0) {
            if let Some((p50, p99, max)) = f.from_start_ms {
                println!(
                    "          {k} from the call's start: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
                );
            }
        }
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
        for (k, f) in &results {
            match k.as_str() {
                "jwt" => println!(
                    "  jwt mint rate = {:.1}x the single-commit rate, {:.0}% of raw ES256 signing",
                    f.ops_per_s / b.redb_commit_per_s,
                    100.0 * f.ops_per_s / b.es256_sign_per_s
                ),
                "x509" => println!(
                    "  x509 mint rate = {:.1}x the single-commit rate, {:.0}% of raw CSR check + sign",
                    f.ops_per_s / b.redb_commit_per_s,
                    100.0 * f.ops_per_s / b.csr_issue_per_s
                ),
                _ => {}
            }
        }
    }
    Ok(())
}
