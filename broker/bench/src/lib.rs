//! `sigil bench`: load against a real broker over real TLS, every issuance durable with its
//! audit entry. Prints throughput and latency percentiles, the broker's CPU and memory and,
//! with `--baseline`, the raw costs measured in the same run (one durable store commit, one
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

use sigil_proto::v1::admin_client::AdminClient;

mod peer;
mod populate;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// JWT-SVID mint over mTLS.
    Jwt,
    /// X.509-SVID from a (pre-made) CSR over mTLS: the broker's side of issuance.
    X509,
    /// Join token -> first X.509-SVID (a fresh token per attestation).
    Attest,
    /// The SDK's renewal: a new key and CSR made by the client, mTLS, chain checked.
    Renew,
    /// Three JWT-SVIDs to one X.509-SVID.
    Mixed,
    /// Revocation reaching N watch streams.
    Revoke,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Jwt => "jwt",
            Scenario::X509 => "x509",
            Scenario::Attest => "attest",
            Scenario::Renew => "renew",
            Scenario::Mixed => "mixed",
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
    /// Scenarios to run (default jwt,x509; with --baseline jwt,x509,revoke).
    #[arg(long, value_enum, value_delimiter = ',')]
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
    /// Stop each scenario after this many completed operations instead of after --duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Join tokens made up front for the attest scenario (it ends when they run out; it has
    /// no warm-up, so none is wasted).
    #[arg(long, default_value_t = 10_000)]
    pub attest_tokens: usize,
    /// Also drive a peer with the same load and CSRs: `cfssl` (its `cfssl serve` sign API,
    /// when the cfssl binary is installed).
    #[arg(long)]
    pub peer: Option<Peer>,
    /// Fill the store with this many ledger rows (and --live-revocations revocations) after
    /// the empty-store run, restart the broker, and run again: the scale figures (embedded
    /// brokers only; default with --baseline: 1000000; 0 turns it off).
    #[arg(long)]
    pub populate: Option<u64>,
    /// Live revocations to add with --populate.
    #[arg(long, default_value_t = 100_000)]
    pub live_revocations: u64,
    /// Unmeasured warm-up per scenario.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Watch streams for the revoke scenario, comma-separated, a run each (default 1000;
    /// with --baseline 10000).
    #[arg(long, value_delimiter = ',')]
    pub watchers: Vec<usize>,
    /// Revocations per revoke run.
    #[arg(long, default_value_t = 20)]
    pub revocations: usize,
    /// Also measure in the same run the raw costs on this machine (a durable commit, ES256,
    /// CSR check + leaf signing, a plain gRPC round trip over the same TLS connections) and,
    /// unless told otherwise, cfssl and the --populate scale run: every figure of the
    /// performance targets (docs/PERFORMANCE.md).
    #[arg(long)]
    pub baseline: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A broker that is already running, as the caller resolved it (the CLI from its flags).
#[derive(Debug, Clone)]
pub struct External {
    /// Its gRPC URL.
    pub url: String,
    /// The trust bundle (PEM).
    pub bundle_pem: Vec<u8>,
    /// An operator credential (PEM certificate and key).
    pub admin_cert_pem: Vec<u8>,
    /// The operator key (PEM).
    pub admin_key_pem: zeroize::Zeroizing<Vec<u8>>,
}

impl External {
    fn connect(&self) -> Result<AdminClient<Channel>> {
        Ok(sigil_sdk::connect_admin(
            &self.url,
            &self.bundle_pem,
            &self.admin_cert_pem,
            &self.admin_key_pem,
        )?)
    }
}

/// A peer to compare with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// CloudFlare's cfssl (`cfssl serve`), which signs and stores nothing.
    Cfssl,
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
    /// How to reach its admin API.
    conn: External,
    broker_pid: Option<u32>,
    child: Option<tokio::process::Child>,
    /// Embedded brokers: the data dir and master key, for stopping, populating, restarting.
    own: Option<(
        tempfile::TempDir,
        std::path::PathBuf,
        sigil_broker::seal::MasterKey,
    )>,
}

/// Starts `sigil serve` on `data`; returns the child, its URL and how long it took to be ready.
async fn spawn_broker(
    data: &std::path::Path,
    master: &sigil_broker::seal::MasterKey,
) -> Result<(tokio::process::Child, String, Duration)> {
    let exe = std::env::current_exe().context("locating the sigil binary")?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .args(["serve", "--data-dir"])
        .arg(data)
        .env(
            sigil_broker::seal::MASTER_KEY_ENV,
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
    let url = tokio::time::timeout(Duration::from_secs(120), async {
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
    let ready = started.elapsed();
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url, ready))
}

/// Stops an embedded broker gracefully (SIGTERM, then wait).
async fn stop_broker(child: &mut tokio::process::Child) -> Result<()> {
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(r) => {
            r?;
            Ok(())
        }
        Err(_) => {
            child.kill().await?;
            bail!("the broker did not stop within 30s of SIGTERM")
        }
    }
}

/// Initializes a temporary data dir and starts `sigil serve` on it as a child process.
async fn embedded() -> Result<Target> {
    let dir = tempfile::tempdir().context("temp dir")?;
    let data = dir.path().join("data");
    let master = sigil_broker::seal::MasterKey::generate();
    sigil_broker::init::init(
        sigil_broker::init::InitOptions {
            data_dir: data.clone(),
            trust_domain: "bench.sigil.test".parse().map_err(|e| anyhow!("{e}"))?,
            listen: Some(([127, 0, 0, 1], 0).into()),
            http_listen: Some(None),
            operator: "bench".into(),
            operator_ttl: Duration::from_secs(86400),
            master_key: Some(master.clone()),
        },
        &sigil_broker::clock::SystemClock,
    )
    .await?;
    let (child, url, _) = spawn_broker(&data, &master).await?;
    let bundle_pem = std::fs::read(data.join(sigil_broker::config::BUNDLE_FILE))?;
    let admin = data.join(sigil_broker::config::ADMIN_DIR);
    let conn = External {
        url: url.clone(),
        bundle_pem: bundle_pem.clone(),
        admin_cert_pem: std::fs::read(admin.join("admin.crt"))?,
        admin_key_pem: zeroize::Zeroizing::new(std::fs::read(admin.join("admin.key"))?),
    };
    Ok(Target {
        url,
        bundle_pem,
        conn,
        broker_pid: child.id(),
        child: Some(child),
        own: Some((dir, data, master)),
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
    Ok(workload_channels(t, spiffe_id, n)
        .await?
        .into_iter()
        .map(BrokerClient::new)
        .collect())
}

/// A workload client of `spiffe_id`, attested with a join token made for it.
async fn attested_workload(
    t: &Target,
    admin: &mut pb::admin_client::AdminClient<Channel>,
    spiffe_id: &str,
) -> Result<(WorkloadClient, sigil_sdk::Credentials)> {
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
    Ok((w, creds))
}

/// Attests `n` workloads of the bench identity and returns an mTLS channel for each.
async fn workload_channels(t: &Target, spiffe_id: &str, n: usize) -> Result<Vec<Channel>> {
    let mut admin = t.conn.connect()?;
    let target = BrokerTarget::parse(&t.url)?;
    let roots = transport::roots_from_pem(&t.bundle_pem)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (_, creds) = attested_workload(t, &mut admin, spiffe_id).await?;
        let slot = Arc::new(ClientCertSlot::default());
        slot.set(
            creds.svid.cert_chain.clone(),
            creds.svid.private_key_der().expose_secret(),
        )?;
        let tls = transport::client_config(roots.clone(), Some(slot))?;
        out.push(transport::channel(&target, tls, Duration::from_secs(30))?);
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

/// Why one operation did not complete.
#[derive(Debug)]
enum OpError {
    /// A failed call, by gRPC code (or a short reason).
    Failed(String),
    /// Nothing left to do (the attest scenario ran out of join tokens).
    Exhausted,
}

fn code(e: tonic::Status) -> OpError {
    OpError::Failed(format!("{:?}", e.code()))
}

fn sdk_code(e: sigil_sdk::SdkError) -> OpError {
    OpError::Failed(
        e.code()
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| format!("{:?}", e.kind())),
    )
}

/// Runs `op` from `concurrency` tasks: `warmup`, then measures for `duration` (or until
/// `count` operations completed), recording each completed operation's latency.
async fn drive<F, Fut>(
    name: &str,
    a: &BenchArgs,
    pid: Option<u32>,
    (warmup, duration): (Duration, Duration),
    op: F,
) -> Figures
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), OpError>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let exhausted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(a.concurrency);
    for i in 0..a.concurrency {
        let (stop, measuring, done, exhausted, op) = (
            stop.clone(),
            measuring.clone(),
            done.clone(),
            exhausted.clone(),
            op.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = i as u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let r = op(i, n).await;
                n += 1;
                if matches!(r, Err(OpError::Exhausted)) {
                    exhausted.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match r {
                    Ok(()) => {
                        if let Some(h) = h.as_mut() {
                            let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(OpError::Failed(c)) => *errors.entry(c).or_default() += 1,
                    Err(OpError::Exhausted) => {}
                }
            }
            (h, errors)
        }));
    }
    let bar = if a.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    bar.set_message(format!("{name}: warming up"));
    let all_gone = |x: &AtomicU64| x.load(Ordering::Relaxed) as usize >= a.concurrency;
    let warm = Instant::now();
    while warm.elapsed() < warmup && !all_gone(&exhausted) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        bar.tick();
    }
    measuring.store(true, Ordering::SeqCst);
    let cpu0 = pid.and_then(cpu_secs);
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = done.load(Ordering::Relaxed);
        let over = match a.count {
            Some(c) => n >= c,
            None => started.elapsed() >= duration,
        };
        if over || all_gone(&exhausted) {
            break;
        }
        bar.set_message(format!(
            "{name}: {n} ops, {:.0}/s",
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

fn jwt_request() -> pb::MintJwtSvidRequest {
    pb::MintJwtSvidRequest {
        request: Some(pb::JwtRequest {
            audiences: vec!["bench".into()],
            scopes: Vec::new(),
            ttl_seconds: 300,
        }),
    }
}

/// What the issuance scenarios run against.
struct Fixture {
    channels: Arc<Vec<Channel>>,
    clients: Arc<Vec<BrokerClient<Channel>>>,
    anon: Arc<Vec<BrokerClient<Channel>>>,
    sdk: Arc<Vec<WorkloadClient>>,
    csrs: Arc<Vec<Vec<u8>>>,
}

async fn fixture(t: &Target, spiffe_id: &str, a: &BenchArgs) -> Result<Fixture> {
    let n = a.connections.max(1);
    let channels = workload_channels(t, spiffe_id, n).await?;
    let clients = channels.iter().cloned().map(BrokerClient::new).collect();
    let target = BrokerTarget::parse(&t.url)?;
    let roots = transport::roots_from_pem(&t.bundle_pem)?;
    let anon = (0..n)
        .map(|_| {
            Ok(BrokerClient::new(transport::channel(
                &target,
                transport::client_config(roots.clone(), None)?,
                Duration::from_secs(30),
            )?))
        })
        .collect::<Result<Vec<_>, sigil_sdk::SdkError>>()?;
    let mut sdk = Vec::new();
    if a.scenario.contains(&Scenario::Renew) {
        let mut admin = t.conn.connect()?;
        for _ in 0..n {
            sdk.push(attested_workload(t, &mut admin, spiffe_id).await?.0);
        }
    }
    Ok(Fixture {
        channels: Arc::new(channels),
        clients: Arc::new(clients),
        anon: Arc::new(anon),
        sdk: Arc::new(sdk),
        csrs: Arc::new(csr_pool(256)?),
    })
}

/// Join tokens for the attest scenario, made up front (concurrently) so that making them is
/// not part of what is measured.
async fn join_tokens(t: &Target, spiffe_id: &str, n: usize) -> Result<Arc<Vec<String>>> {
    let admin = t.conn.connect()?;
    let mut tasks = Vec::new();
    let per = n.div_ceil(32);
    for k in 0..32 {
        let mut admin = admin.clone();
        let id = spiffe_id.to_owned();
        let count = per.min(n.saturating_sub(k * per));
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                out.push(
                    admin
                        .create_join_token(pb::CreateJoinTokenRequest {
                            id_or_spiffe_id: id.clone(),
                            ttl_seconds: 3600,
                        })
                        .await?
                        .into_inner()
                        .token,
                );
            }
            Ok::<_, tonic::Status>(out)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await?.map_err(sigil_sdk::SdkError::from)?);
    }
    Ok(Arc::new(all))
}

async fn run_scenario(
    s: Scenario,
    fx: &Fixture,
    tokens: Option<Arc<Vec<String>>>,
    a: &BenchArgs,
    pid: Option<u32>,
) -> Figures {
    let (clients, anon, sdk, csrs) = (
        fx.clients.clone(),
        fx.anon.clone(),
        fx.sdk.clone(),
        fx.csrs.clone(),
    );
    match s {
        Scenario::Jwt => {
            drive(s.name(), a, pid, (a.warmup, a.duration), move |i, _| {
                let mut c = clients[i % clients.len()].clone();
                async move {
                    c.mint_jwt_svid(jwt_request())
                        .await
                        .map(|_| ())
                        .map_err(code)
                }
            })
            .await
        }
        Scenario::X509 | Scenario::Mixed => {
            let mixed = s == Scenario::Mixed;
            drive(s.name(), a, pid, (a.warmup, a.duration), move |i, n| {
                let mut c = clients[i % clients.len()].clone();
                let csr = csrs[n as usize % csrs.len()].clone();
                async move {
                    // Mixed: three JWT-SVIDs to one certificate renewal.
                    if mixed && n % 4 != 0 {
                        return c
                            .mint_jwt_svid(jwt_request())
                            .await
                            .map(|_| ())
                            .map_err(code);
                    }
                    c.mint_x509_svid(pb::MintX509SvidRequest {
                        csr,
                        ttl_seconds: 600,
                        dns_names: Vec::new(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(code)
                }
            })
            .await
        }
        Scenario::Renew => {
            drive(s.name(), a, pid, (a.warmup, a.duration), move |i, _| {
                let w = sdk[i % sdk.len().max(1)].clone();
                async move { w.renew_x509_svid().await.map(|_| ()).map_err(sdk_code) }
            })
            .await
        }
        Scenario::Attest => {
            let tokens = tokens.unwrap_or_default();
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            drive(
                s.name(),
                a,
                pid,
                (Duration::ZERO, a.duration),
                move |i, n| {
                    let mut c = anon[i % anon.len()].clone();
                    let csr = csrs[n as usize % csrs.len()].clone();
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let token = tokens.get(k).cloned();
                    async move {
                        let Some(token) = token else {
                            return Err(OpError::Exhausted);
                        };
                        c.attest(pb::AttestRequest {
                            evidence: Some(pb::Evidence {
                                kind: Some(pb::evidence::Kind::JoinToken(pb::JoinTokenEvidence {
                                    token,
                                })),
                            }),
                            csr,
                            ttl_seconds: 600,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                        .map_err(code)
                    }
                },
            )
            .await
        }
        Scenario::Revoke => Figures::default(),
    }
}

/// A plain gRPC unary round trip over the same TLS connections: `grpc.health.v1/Check`,
/// which does no work, so this is the transport's ceiling in this run.
async fn tls_echo(fx: &Fixture, a: &BenchArgs, pid: Option<u32>) -> Figures {
    let channels = fx.channels.clone();
    let times = (a.warmup, a.duration.min(Duration::from_secs(5)));
    drive("tls echo", a, pid, times, move |i, _| {
        let ch = channels[i % channels.len()].clone();
        async move {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            h.check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
            .map_err(code)
        }
    })
    .await
}

/// Opens `n` watch streams (spread over connections of at most 64 streams each, each with a
/// workload certificate of its own: the broker's default per-client cap), revokes
/// `revocations` credentials one after another, and measures the delay from each revoke call's
/// return to each watcher receiving it.
async fn run_revoke(
    t: &Target,
    spiffe_id: &str,
    n: usize,
    revocations: usize,
    pid: Option<u32>,
) -> Result<Figures> {
    // Watching needs a credential, and one credential may hold a bounded number of streams.
    let per_conn = 64;
    let conns = workloads(t, spiffe_id, n.div_ceil(per_conn)).await?;
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
    /// Durable single-row store commits per second (one fsync each).
    pub store_commit_per_s: f64,
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
    let store_commit_per_s = sigil_broker::store::durable_commit_rate(dir.path(), 300)?;
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
        store_commit_per_s,
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

/// Latency of the admin RevokeCredential call, one at a time, for `n` fresh JWT-SVIDs.
async fn revoke_calls(t: &Target, spiffe_id: &str, n: usize) -> Result<Figures> {
    let clients = workloads(t, spiffe_id, 1).await?;
    let mut c = clients[0].clone();
    let mut jtis = Vec::with_capacity(n);
    for _ in 0..n {
        let r = c.mint_jwt_svid(jwt_request()).await?;
        jtis.push(r.into_inner().svid.map(|s| s.jti).unwrap_or_default());
    }
    let mut admin = t.conn.connect()?;
    let mut hist = histogram();
    let started = Instant::now();
    let mut errors = BTreeMap::new();
    for jti in jtis {
        let t0 = Instant::now();
        match admin
            .revoke_credential(pb::RevokeCredentialRequest {
                credential_id: jti,
                reason: "bench".into(),
            })
            .await
        {
            Ok(_) => {
                if let Some(h) = hist.as_mut() {
                    let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                }
            }
            Err(e) => *errors.entry(format!("{:?}", e.code())).or_default() += 1,
        }
    }
    let mut f = Figures {
        ops: n as u64,
        ops_per_s: n as f64 / started.elapsed().as_secs_f64(),
        errors,
        ..Figures::default()
    };
    quantiles(&hist, &mut f);
    Ok(f)
}

/// The issuance scenarios (and the transport echo) against `t`.
async fn issuance(
    t: &Target,
    spiffe_id: &str,
    scenarios: &[Scenario],
    a: &BenchArgs,
    echo: bool,
) -> Result<(Vec<(String, Figures)>, Option<Figures>, Arc<Vec<Vec<u8>>>)> {
    let mut out = Vec::new();
    let fx = fixture(t, spiffe_id, a).await?;
    for s in scenarios.iter().copied().filter(|s| *s != Scenario::Revoke) {
        let tokens = if s == Scenario::Attest {
            Some(join_tokens(t, spiffe_id, a.attest_tokens).await?)
        } else {
            None
        };
        out.push((
            s.name().to_owned(),
            run_scenario(s, &fx, tokens, a, t.broker_pid).await,
        ));
    }
    let echo = if echo {
        Some(tls_echo(&fx, a, t.broker_pid).await)
    } else {
        None
    };
    Ok((out, echo, fx.csrs.clone()))
}

fn by_name<'a>(r: &'a [(String, Figures)], name: &str) -> Option<&'a Figures> {
    r.iter().find(|(k, _)| k == name).map(|(_, f)| f)
}

/// Runs `sigil bench`.
///
/// `external` is the broker to measure when the caller named one; without it (or with
/// `--embedded`) the bench starts its own.
pub async fn run(mut a: BenchArgs, external: Option<External>) -> Result<()> {
    let use_embedded = a.embedded || external.is_none();
    if a.scenario.is_empty() {
        a.scenario = if a.baseline {
            vec![Scenario::Jwt, Scenario::X509, Scenario::Revoke]
        } else {
            vec![Scenario::Jwt, Scenario::X509]
        };
    }
    if a.watchers.is_empty() {
        a.watchers = vec![if a.baseline { 10_000 } else { 1000 }];
    }
    let populate = match a.populate {
        Some(0) => None,
        Some(n) => Some(n),
        None if a.baseline && use_embedded => Some(1_000_000),
        None => None,
    };
    if populate.is_some() && !use_embedded {
        bail!("--populate needs an embedded broker (it stops, fills and restarts it)");
    }
    let peer = a.peer.or((a.baseline).then_some(Peer::Cfssl));
    let mut target = match external {
        Some(e) if !use_embedded => Target {
            url: e.url.clone(),
            bundle_pem: e.bundle_pem.clone(),
            conn: e,
            broker_pid: None,
            child: None,
            own: None,
        },
        _ => embedded().await?,
    };
    let spiffe_id = bench_identity(&target).await?;
    let mut scenarios = a.scenario.clone();
    scenarios.sort();
    scenarios.dedup();

    let (mut results, echo, csrs) =
        issuance(&target, &spiffe_id, &scenarios, &a, a.baseline).await?;
    if scenarios.contains(&Scenario::Revoke) {
        for n in a.watchers.clone() {
            let f = run_revoke(
                &target,
                &spiffe_id,
                n,
                a.revocations.max(1),
                target.broker_pid,
            )
            .await?;
            results.push((format!("revoke@{n}"), f));
        }
    }
    if populate.is_some() || a.baseline {
        results.push((
            "revoke_call".into(),
            revoke_calls(&target, &spiffe_id, 200).await?,
        ));
    }
    let base = if a.baseline {
        Some(tokio::task::spawn_blocking(baseline).await??)
    } else {
        None
    };
    let peer_figures = match peer {
        Some(Peer::Cfssl) => match peer::start_cfssl().await {
            Ok(c) => Some(
                peer::drive_cfssl(&c, &csrs, &a)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            Err(e) => Some(Err(e.to_string())),
        },
        None => None,
    };

    // Scale: fill the store, restart, measure again.
    let mut scale = None;
    if let Some(rows) = populate {
        let mut admin = target.conn.connect()?;
        let ident = admin
            .get_identity(pb::GetIdentityRequest {
                id_or_spiffe_id: spiffe_id.clone(),
            })
            .await
            .map_err(sigil_sdk::SdkError::from)?
            .into_inner();
        let (_, data, master) = target
            .own
            .as_ref()
            .ok_or_else(|| anyhow!("--populate needs an embedded broker"))?;
        let (data, master) = (data.clone(), master.clone());
        if let Some(c) = target.child.as_mut() {
            stop_broker(c).await?;
        }
        let bar = if a.json {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(0)
        };
        bar.set_message("populating the store");
        let p = populate::populate(
            &data,
            &master,
            &ident.id,
            &spiffe_id,
            rows,
            a.live_revocations,
            &bar,
        )
        .await?;
        bar.finish_and_clear();
        let size: u64 = sigil_broker::store::StoreConfig::in_data_dir(&data)
            .files()
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let (child, url, ready) = spawn_broker(&data, &master).await?;
        target.broker_pid = child.id();
        target.child = Some(child);
        target.url = url.clone();
        target.conn.url = url;
        // The comparison with an empty store: a fresh broker measured alternately with the
        // populated one, so both see the same stretch of a shared machine.
        let reference = embedded().await?;
        let reference_id = bench_identity(&reference).await?;
        let issuing: Vec<Scenario> = scenarios
            .iter()
            .copied()
            .filter(|s| matches!(s, Scenario::Jwt | Scenario::X509))
            .collect();
        let full = a.duration;
        a.duration = (full / 2).max(Duration::from_secs(2));
        let alternated = alternate(
            (&target, &spiffe_id),
            (&reference, &reference_id),
            &issuing,
            &a,
        )
        .await;
        a.duration = full;
        let (mut again, empty) = alternated?;
        drop(reference);
        again.push((
            "revoke_call".into(),
            revoke_calls(&target, &spiffe_id, 200).await?,
        ));
        scale = Some((p, size, ready, again, empty));
    }

    report(
        &a,
        use_embedded,
        &target,
        &results,
        echo.as_ref(),
        base.as_ref(),
        peer_figures.as_ref(),
        scale.as_ref(),
    )
}

/// The populated store: what was written, its size, time to ready, its figures, and the
/// figures of an empty store measured alternately with it.
type Scale = (
    populate::Populated,
    u64,
    Duration,
    Vec<(String, Figures)>,
    Vec<(String, Figures)>,
);

/// Rounds of [`alternate`]: populated then empty, then empty then populated (ABBA), so a
/// machine that speeds up or slows down during the run favours neither.
const ALTERNATE_ROUNDS: usize = 2;

/// Runs each of `scenarios` on `first` and `second` by turns and returns each one's mean
/// figures over [`ALTERNATE_ROUNDS`].
async fn alternate(
    first: (&Target, &str),
    second: (&Target, &str),
    scenarios: &[Scenario],
    a: &BenchArgs,
) -> Result<(Vec<(String, Figures)>, Vec<(String, Figures)>)> {
    let mut runs: [BTreeMap<String, Vec<Figures>>; 2] = Default::default();
    for round in 0..ALTERNATE_ROUNDS {
        for s in scenarios {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                let (t, id) = if which == 0 { first } else { second };
                let (r, _, _) = issuance(t, id, &[*s], a, false).await?;
                for (k, f) in r {
                    runs[which].entry(k).or_default().push(f);
                }
            }
        }
    }
    let means = |m: &BTreeMap<String, Vec<Figures>>| {
        scenarios
            .iter()
            .filter_map(|s| m.get(s.name()).map(|f| (s.name().to_owned(), mean(f))))
            .collect::<Vec<_>>()
    };
    Ok((means(&runs[0]), means(&runs[1])))
}

/// Mean throughput and percentiles of several runs of one scenario; the worst maximum; errors
/// and operations summed.
fn mean(runs: &[Figures]) -> Figures {
    let n = runs.len().max(1) as f64;
    let avg = |f: fn(&Figures) -> f64| runs.iter().map(f).sum::<f64>() / n;
    let cores: Vec<f64> = runs.iter().filter_map(|f| f.broker_cores).collect();
    let mut errors = BTreeMap::new();
    for f in runs {
        for (k, v) in &f.errors {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
    }
    Figures {
        ops_per_s: avg(|f| f.ops_per_s),
        p50_ms: avg(|f| f.p50_ms),
        p90_ms: avg(|f| f.p90_ms),
        p99_ms: avg(|f| f.p99_ms),
        max_ms: runs.iter().map(|f| f.max_ms).fold(0.0, f64::max),
        ops: runs.iter().map(|f| f.ops).sum(),
        errors,
        broker_cores: (!cores.is_empty()).then(|| cores.iter().sum::<f64>() / cores.len() as f64),
        broker_rss_mb: runs.iter().filter_map(|f| f.broker_rss_mb).reduce(f64::max),
        watchers: 0,
        from_start_ms: None,
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    a: &BenchArgs,
    use_embedded: bool,
    target: &Target,
    results: &[(String, Figures)],
    echo: Option<&Figures>,
    base: Option<&Baseline>,
    peer: Option<&Result<Figures, String>>,
    scale: Option<&Scale>,
) -> Result<()> {
    let jwt = by_name(results, "jwt");
    let x509 = by_name(results, "x509");
    let cfssl = peer.and_then(|p| p.as_ref().ok());
    if a.json {
        let scen: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(k, f)| (k.clone(), figures_json(f)))
            .collect();
        let mut out = json!({"scenarios": scen, "concurrency": a.concurrency, "connections": a.connections, "embedded": use_embedded});
        if let Some(b) = base {
            out["baseline"] = json!({
                "tls_echo_per_s": echo.map(|e| e.ops_per_s.round()),
                "tls_echo": echo.map(figures_json),
                "store_commit_per_s": b.store_commit_per_s.round(),
                "es256_sign_per_s": b.es256_sign_per_s.round(),
                "csr_issue_per_s": b.csr_issue_per_s.round(),
            });
        }
        match peer {
            Some(Ok(f)) => out["peer"] = json!({"cfssl": figures_json(f)}),
            Some(Err(why)) => out["peer"] = json!({"cfssl": {"error": why}}),
            None => {}
        }
        let mut ratios = serde_json::Map::new();
        if let (Some(j), Some(e)) = (jwt, echo) {
            ratios.insert("jwt_vs_tls_echo".into(), json!(j.ops_per_s / e.ops_per_s));
        }
        if let (Some(x), Some(c)) = (x509, cfssl) {
            ratios.insert("x509_vs_cfssl".into(), json!(x.ops_per_s / c.ops_per_s));
        }
        if let Some((p, size, ready, again, empty)) = scale {
            let vs: serde_json::Map<String, serde_json::Value> = again
                .iter()
                .filter_map(|(k, f)| {
                    by_name(empty, k)
                        .filter(|e| e.ops_per_s > 0.0 && k != "revoke_call")
                        .map(|e| (k.clone(), json!(f.ops_per_s / e.ops_per_s)))
                })
                .collect();
            out["populated"] = json!({
                "ledger_rows": p.rows, "live_revocations": p.revocations,
                "populate_s": p.took.as_secs_f64(), "store_mb": (*size as f64 / 1e6).round(),
                "ready_after_restart_ms": ready.as_millis() as u64,
                "scenarios": again.iter().map(|(k, f)| (k.clone(), figures_json(f))).collect::<serde_json::Map<_, _>>(),
                "empty_alternated": empty.iter().map(|(k, f)| (k.clone(), figures_json(f))).collect::<serde_json::Map<_, _>>(),
                "alternate_rounds": ALTERNATE_ROUNDS,
                "vs_empty": vs,
            });
        }
        out["ratios"] = serde_json::Value::Object(ratios);
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let place = if use_embedded {
        "a broker process started for this run".to_owned()
    } else {
        target.url.clone()
    };
    println!(
        "against {place}; issuance: {} in flight over {} TLS connections, {}",
        a.concurrency,
        a.connections,
        match a.count {
            Some(c) => format!("{c} operations measured"),
            None => format!("{} measured", sigil_broker::config::dur::format(a.duration)),
        }
    );
    print_table(results);
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
        println!("baseline, measured now:");
        if let Some(e) = echo {
            println!(
                "  gRPC echo over the same TLS connections  {:>9.0}/s  (grpc.health.v1/Check, p99 {:.2} ms)",
                e.ops_per_s, e.p99_ms
            );
        }
        println!(
            "  durable store commit (one fsync)         {:>9.0}/s  (one core)",
            b.store_commit_per_s
        );
        println!(
            "  ES256 sign                               {:>9.0}/s  (one core)",
            b.es256_sign_per_s
        );
        println!(
            "  CSR check + leaf sign                    {:>9.0}/s  (one core)",
            b.csr_issue_per_s
        );
        if let Some(j) = jwt {
            println!(
                "  jwt mint = {:.0}% of the echo rate, {:.1}x the single-commit rate, {:.0}% of raw ES256 signing",
                echo.map(|e| 100.0 * j.ops_per_s / e.ops_per_s)
                    .unwrap_or(0.0),
                j.ops_per_s / b.store_commit_per_s,
                100.0 * j.ops_per_s / b.es256_sign_per_s
            );
        }
        if let Some(x) = x509 {
            println!(
                "  x509 mint = {:.1}x the single-commit rate, {:.0}% of raw CSR check + sign",
                x.ops_per_s / b.store_commit_per_s,
                100.0 * x.ops_per_s / b.csr_issue_per_s
            );
        }
    }
    match peer {
        Some(Ok(c)) => {
            println!();
            println!(
                "peer: cfssl serve (plain HTTP, stores nothing), same CSRs and concurrency: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms{}",
                c.ops_per_s,
                c.p50_ms,
                c.p99_ms,
                if c.errors.is_empty() {
                    String::new()
                } else {
                    format!(", {} errors", c.errors.values().sum::<u64>())
                }
            );
            if let Some(x) = x509 {
                println!("  sigil x509 = {:.2}x cfssl", x.ops_per_s / c.ops_per_s);
            }
        }
        Some(Err(why)) => {
            println!();
            println!("peer: cfssl not measured: {why}");
        }
        None => {}
    }
    if let Some((p, size, ready, again, empty)) = scale {
        println!();
        println!(
            "scale: {} ledger rows and {} live revocations written in {:.1}s (store {:.0} MB); broker ready {} ms after restart",
            p.rows,
            p.revocations,
            p.took.as_secs_f64(),
            *size as f64 / 1e6,
            ready.as_millis()
        );
        println!(
            "populated and a fresh empty broker measured by turns ({ALTERNATE_ROUNDS} runs each, ABBA); means:"
        );
        print_table(again);
        println!("empty store:");
        print_table(empty);
        for (k, f) in again {
            if let Some(e) = by_name(empty, k).filter(|e| e.ops_per_s > 0.0 && k != "revoke_call") {
                println!(
                    "  {k}: {:.0}% of the empty-store rate",
                    100.0 * f.ops_per_s / e.ops_per_s
                );
            }
        }
    }
    if a.baseline {
        println!();
        targets(results, echo, cfssl, scale);
    }
    Ok(())
}

fn print_table(results: &[(String, Figures)]) {
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
    for (k, f) in results {
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
            println!("               {n} x {code}");
        }
    }
}

/// The performance targets (docs/PERFORMANCE.md) against this run's figures.
fn targets(
    results: &[(String, Figures)],
    echo: Option<&Figures>,
    cfssl: Option<&Figures>,
    scale: Option<&Scale>,
) {
    let mark = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "not measured",
    };
    let row = |what: &str, target: &str, got: String, ok: Option<bool>| {
        println!("  {what:<46} {target:<30} {got:<36} {}", mark(ok));
    };
    println!(
        "targets (2 cores, client on the same machine, TLS, every issuance durable with its audit entry):"
    );
    let jwt = by_name(results, "jwt");
    let x509 = by_name(results, "x509");
    if let Some(j) = jwt {
        let ratio = echo.map(|e| j.ops_per_s / e.ops_per_s);
        row(
            "JWT-SVID mint",
            ">= 20000/s and >= 50% of echo",
            format!(
                "{:.0}/s, {}",
                j.ops_per_s,
                ratio.map_or("echo not measured".into(), |r| format!(
                    "{:.0}% of echo",
                    r * 100.0
                ))
            ),
            Some(j.ops_per_s >= 20_000.0 && ratio.is_some_and(|r| r >= 0.5)),
        );
        row(
            "JWT-SVID p99 at 64 in flight",
            "<= 10 ms",
            format!("{:.2} ms", j.p99_ms),
            Some(j.p99_ms <= 10.0),
        );
    }
    if let Some(x) = x509 {
        let ratio = cfssl.map(|c| x.ops_per_s / c.ops_per_s);
        row(
            "X.509-SVID from CSR",
            ">= 8000/s and >= 2x cfssl",
            format!(
                "{:.0}/s, {}",
                x.ops_per_s,
                ratio.map_or("cfssl not measured".into(), |r| format!("{r:.2}x cfssl"))
            ),
            Some(x.ops_per_s >= 8_000.0 && ratio.is_some_and(|r| r >= 2.0)),
        );
        row(
            "X.509-SVID p99",
            "<= 15 ms",
            format!("{:.2} ms", x.p99_ms),
            Some(x.p99_ms <= 15.0),
        );
    }
    match scale {
        Some((p, _, ready, again, empty)) => {
            let worst = again
                .iter()
                .filter(|(k, _)| k != "revoke_call")
                .filter_map(|(k, f)| by_name(empty, k).map(|e| f.ops_per_s / e.ops_per_s))
                .fold(f64::INFINITY, f64::min);
            row(
                &format!(
                    "issuance at {} rows / {} revocations",
                    p.rows, p.revocations
                ),
                "within 10% of empty",
                format!("{:.0}% of empty (worst scenario)", worst * 100.0),
                Some(worst >= 0.9),
            );
            if let Some(r) = by_name(again, "revoke_call") {
                row(
                    "revoke call p99, populated",
                    "<= 5 ms",
                    format!("{:.2} ms", r.p99_ms),
                    Some(r.p99_ms <= 5.0),
                );
            }
            row(
                "broker ready after restart",
                "<= 2 s",
                format!("{} ms", ready.as_millis()),
                Some(ready.as_millis() <= 2000),
            );
        }
        None => row("scale (--populate)", "", String::new(), None),
    }
    let revoke = results
        .iter()
        .filter(|(_, f)| f.watchers > 0)
        .max_by_key(|(_, f)| f.watchers);
    match revoke {
        Some((_, f)) => {
            let p99 = f.from_start_ms.map(|x| x.1).unwrap_or(f.p99_ms);
            row(
                &format!("revocation reaching {} watchers", f.watchers),
                "p99 <= 1 s (stretch 100 ms)",
                format!("p99 {p99:.1} ms from the call's start"),
                Some(p99 <= 1000.0 && f.errors.is_empty()),
            );
            row(
                &format!("broker RSS with {} watchers", f.watchers),
                "<= 500 MB",
                f.broker_rss_mb.map_or("-".into(), |r| format!("{r:.0} MB")),
                f.broker_rss_mb.map(|r| r <= 500.0),
            );
        }
        None => row("revocation fan-out", "", String::new(), None),
    }
}
