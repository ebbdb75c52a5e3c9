//! `sigil init` and `sigil serve`: create a data dir, run the broker on one; and what `sigil dev`
//! (and `sigil audit tail --follow`) share with them: loading a data dir's config, parsing
//! `--http-listen`, waiting for a shutdown signal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;

/// `sigil init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The data dir to create (must not exist or be empty).
    #[arg(long, env = "SIGIL_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The trust domain, e.g. `example.org`.
    #[arg(long)]
    pub trust_domain: String,
    /// gRPC listen address to configure.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// HTTP listen address to configure, or `off`.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// A DNS name workloads and operators reach the broker by, for its certificate (besides
    /// `localhost` and the loopback addresses); repeat for several. Written to
    /// `server_names` in sigil.toml.
    #[arg(long, value_name = "NAME")]
    pub server_name: Vec<String>,
    /// Name of the first operator.
    #[arg(long, default_value = "admin")]
    pub operator: String,
    /// Lifetime of the first operator credential.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    pub operator_ttl: Duration,
    /// When the data dir already holds a config (an earlier `sigil init`), say so and exit 0
    /// without changing anything: for init containers and compose jobs that run on every
    /// start.
    #[arg(long)]
    pub if_missing: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Where the store is, when it is not the embedded one in the data dir.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// The store: a PostgreSQL URL (postgres://user:password@host:5432/sigil) shared by every
    /// replica (overrides `store` in the config; unset: the embedded store in the data dir).
    #[arg(long = "store", env = "SIGIL_STORE", hide_env_values = true)]
    pub url: Option<String>,
    /// CA certificates (PEM) to verify the PostgreSQL server with (overrides
    /// `store_ca_file`).
    #[arg(long = "store-ca-file", env = "SIGIL_STORE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

impl StoreArgs {
    /// Applies the flags to `cfg`.
    pub(crate) fn apply(&self, cfg: &mut sigil_broker::config::Config) -> Result<()> {
        if let Some(u) = &self.url {
            cfg.store = Some(sigil_broker::config::StoreUrl(u.clone()));
        }
        if let Some(c) = &self.ca_file {
            cfg.store_ca_file = Some(c.clone());
        }
        cfg.validate()?;
        Ok(())
    }
}

/// `sigil serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The data dir made by `sigil init`.
    #[arg(long, env = "SIGIL_DATA_DIR")]
    pub data_dir: PathBuf,
    /// gRPC listen address (overrides the config).
    #[arg(long, env = "SIGIL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HTTP listen address, or `off` (overrides the config).
    #[arg(long, env = "SIGIL_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Also serve on this Unix socket: Unix attestation, the SPIFFE Workload API and the
    /// Broker API (overrides `workload_socket` in the config).
    #[arg(long, env = "SIGIL_WORKLOAD_SOCKET")]
    pub workload_socket: Option<PathBuf>,
    /// Read the configuration from this file instead of DATA_DIR/sigil.toml (e.g. a mounted
    /// ConfigMap); the data dir stays where --data-dir says, and the master key where
    /// `master_key_file` (or SIGIL_MASTER_KEY) says.
    #[arg(long, env = "SIGIL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The master key file (overrides `master_key_file`; SIGIL_MASTER_KEY, the key itself,
    /// still wins): e.g. a mounted Secret or a systemd credential.
    #[arg(long, env = "SIGIL_MASTER_KEY_FILE", value_name = "FILE")]
    pub master_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `sigil init`.
pub(crate) async fn init(a: InitArgs) -> Result<()> {
    let existing = a.data_dir.join(sigil_broker::config::CONFIG_FILE);
    if a.if_missing && existing.exists() {
        println!(
            "{} exists: {} is initialized already; nothing changed",
            existing.display(),
            a.data_dir.display()
        );
        return Ok(());
    }
    let td = a
        .trust_domain
        .parse()
        .map_err(|e| anyhow!("--trust-domain: {e}"))?;
    let master_key = sigil_broker::seal::MasterKey::from_env()?;
    let report = sigil_broker::init::init(
        sigil_broker::init::InitOptions {
            data_dir: a.data_dir,
            trust_domain: td,
            listen: a.listen,
            http_listen: a
                .http_listen
                .as_deref()
                .map(parse_http_listen)
                .transpose()?,
            operator: a.operator,
            operator_ttl: a.operator_ttl,
            master_key,
            store: a.store.url.clone(),
            store_ca_file: a.store.ca_file.clone(),
            server_names: a.server_name,
        },
        &sigil_broker::clock::SystemClock,
    )
    .await?;
    println!(
        "Initialized trust domain {} in {}",
        report.trust_domain,
        report.data_dir.display()
    );
    match &report.master_key_file {
        Some(p) => println!(
            "  master key:     {} (0600; keep a copy somewhere safe, and consider SIGIL_MASTER_KEY instead)",
            p.display()
        ),
        None => println!("  master key:     from SIGIL_MASTER_KEY (not written to disk)"),
    }
    println!("  config:         {}", report.config_file.display());
    println!(
        "  trust bundle:   {} (hand this to workloads)",
        report.bundle.display()
    );
    println!("  operator cert:  {}", report.admin_cert.display());
    println!("  operator key:   {} (0600)", report.admin_key.display());
    println!("Next: sigil serve --data-dir {}", report.data_dir.display());
    Ok(())
}

/// `sigil serve`.
pub(crate) async fn serve(a: ServeArgs) -> Result<()> {
    let mut cfg = load_config(
        &a.data_dir,
        a.config.as_deref(),
        a.listen,
        a.http_listen.as_deref(),
        &a.store,
    )?;
    if let Some(p) = a.workload_socket {
        cfg.workload_socket = Some(p);
    }
    if let Some(p) = a.master_key_file {
        cfg.master_key_file = Some(p);
    }
    let master = sigil_broker::server::load_master_key(&cfg)?;
    let running = match sigil_broker::server::start(
        cfg,
        master,
        sigil_broker::server::StartOptions::default(),
    )
    .await
    {
        Ok(r) => r,
        Err(e @ sigil_broker::server::StartError::Listen { .. })
            if std::error::Error::source(&e).is_none() && e.to_string().contains("in use") =>
        {
            bail!(
                "{e}. Another broker (or another program) is listening there: stop it, or pick another address with --listen / --http-listen (or `listen` and `http_listen` in sigil.toml)"
            )
        }
        Err(e) => return Err(e.into()),
    };
    println!("sigil broker listening on {}", running.url());
    if let Some(h) = running.http_url() {
        println!("sigil http listening on {h}");
    }
    sd_notify("READY=1");
    shutdown_signal().await;
    sd_notify("STOPPING=1");
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// Loads the config of a data dir (or from `config_file`) and applies flag overrides.
pub(crate) fn load_config(
    data_dir: &Path,
    config_file: Option<&Path>,
    listen: Option<SocketAddr>,
    http_listen: Option<&str>,
    store: &StoreArgs,
) -> Result<sigil_broker::config::Config> {
    let mut cfg = match config_file {
        Some(f) => sigil_broker::config::Config::load_file(f, data_dir)?,
        None => sigil_broker::config::Config::load(data_dir)?,
    };
    store.apply(&mut cfg)?;
    let store = cfg.store()?;
    if !store.shared() && !store.exists() {
        bail!(
            "{} is not a Sigil data dir (no {}); run `sigil init --data-dir {} --trust-domain ...` first",
            data_dir.display(),
            store.describe(),
            data_dir.display()
        );
    }
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if let Some(h) = http_listen {
        cfg.http_listen = parse_http_listen(h)?;
    }
    Ok(cfg)
}

/// Parses `ADDR` or `off`.
pub(crate) fn parse_http_listen(v: &str) -> Result<Option<SocketAddr>> {
    if v.eq_ignore_ascii_case("off") || v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Ok(Some(v.parse().with_context(|| {
        format!("--http-listen {v:?} is not an address (or `off`)")
    })?))
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Tells systemd (`Type=notify`) how the service is doing, when it runs under it: the
/// datagram protocol of sd_notify(3) on $NOTIFY_SOCKET (a path, or `@` for an abstract name).
pub(crate) fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)?;
            }
            None => {
                sock.send_to(state.as_bytes(), &path)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "could not notify systemd (NOTIFY_SOCKET)");
    }
}
