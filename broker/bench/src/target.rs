//! The broker under load: one started for the run (`sigil serve` as a child process on a
//! temporary data dir, so its CPU and memory are measured apart from the load generator's) or an
//! [`External`] one the caller resolved; and reading a local broker's CPU time and memory.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use sigil_proto::v1::admin_client::AdminClient;
use tokio::io::AsyncBufReadExt;

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
    pub(crate) fn connect(&self) -> Result<AdminClient<sigil_sdk::Failover>> {
        Ok(sigil_sdk::connect_admin(
            &self.url,
            &self.bundle_pem,
            &self.admin_cert_pem,
            &self.admin_key_pem,
        )?)
    }
}

/// The broker a run measures, and how to reach it.
pub(crate) struct Target {
    pub(crate) url: String,
    pub(crate) bundle_pem: Vec<u8>,
    /// How to reach its admin API.
    pub(crate) conn: External,
    pub(crate) broker_pid: Option<u32>,
    pub(crate) child: Option<tokio::process::Child>,
    /// Embedded brokers: the data dir and master key, for stopping, populating, restarting.
    pub(crate) own: Option<(
        tempfile::TempDir,
        std::path::PathBuf,
        sigil_broker::seal::MasterKey,
    )>,
}

/// Starts `sigil serve` on `data`; returns the child, its URL and how long it took to be ready.
pub(crate) async fn spawn_broker(
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
pub(crate) async fn stop_broker(child: &mut tokio::process::Child) -> Result<()> {
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

/// `sigil bench --limits off`: embedded brokers run without rate limits or the calls-in-flight
/// budget.
pub(crate) static LIMITS_OFF: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Rate limits far above anything one load generator sends: the checks still run on every
/// call (their cost is part of the figures), but a bench identity opening thousands of watch
/// streams or minting flat out is never refused.
pub(crate) fn bench_limits(data: &std::path::Path) -> Result<()> {
    let mut cfg = sigil_broker::config::Config::load(data)?;
    let off = LIMITS_OFF.load(std::sync::atomic::Ordering::Relaxed);
    for rate in [
        &mut cfg.limits.authenticated_per_second,
        &mut cfg.limits.authenticated_burst,
        &mut cfg.limits.unauthenticated_per_second,
        &mut cfg.limits.unauthenticated_burst,
    ] {
        *rate = if off { 0 } else { 10_000_000 };
    }
    if off {
        cfg.limits.max_streams_per_client = 0;
    }
    sigil_broker::fsutil::write_atomic(
        &data.join(sigil_broker::config::CONFIG_FILE),
        cfg.to_toml().as_bytes(),
        0o640,
    )?;
    Ok(())
}

/// Initializes a temporary data dir and starts `sigil serve` on it as a child process.
pub(crate) async fn embedded() -> Result<Target> {
    embedded_on(None).await
}

/// [`embedded`], its store in the PostgreSQL database at `store` when given.
pub(crate) async fn embedded_on(store: Option<&str>) -> Result<Target> {
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
            store: store.map(str::to_owned),
            store_ca_file: None,
            server_names: Vec::new(),
        },
        &sigil_broker::clock::SystemClock,
    )
    .await?;
    bench_limits(&data)?;
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
pub(crate) fn rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU seconds (user + system) a process has used.
pub(crate) fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}
