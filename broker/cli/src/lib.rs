//! The `sigil` command line: flag definitions and the commands behind them.
//!
//! Operator commands find the broker and the operator credential from `--data-dir` (which
//! holds `broker.url`, `bundle.pem` and `admin/`), or from explicit flags and `SIGIL_*`
//! environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

mod conn;
mod dev;
mod fetch;
mod operator;

pub use conn::{Conn, broker_url_of};
pub use fetch::FetchArgs;

/// Sigil: short-lived credentials (X.509-SVIDs and JWT-SVIDs) for services, jobs and agents.
#[derive(Debug, Parser)]
#[command(name = "sigil", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log filter (e.g. `info`, `sigil_broker=debug`).
    #[arg(long, global = true, env = "SIGIL_LOG", default_value = "info")]
    pub log: String,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "SIGIL_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
// Parsed once per process; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Create a new data dir: master key, CAs, JWT key, operator credential, bundle.pem.
    Init(InitArgs),
    /// Run the broker.
    Serve(ServeArgs),
    /// Try Sigil in one command: init a local data dir if needed, serve, create a demo
    /// identity and print a join token and the exact `sigil fetch` command to use it.
    Dev(DevArgs),
    /// Manage identities (operator).
    #[command(subcommand)]
    Identity(IdentityCmd),
    /// Manage join tokens (operator).
    #[command(subcommand, name = "join-token")]
    JoinToken(JoinTokenCmd),
    /// Revoke a credential, or everything an identity holds (operator).
    #[command(subcommand)]
    Revoke(RevokeCmd),
    /// Report a leaked token or certificate: revoke it and everything its identity holds, mark
    /// the identity compromised and record the incident (operator).
    Leak(LeakArgs),
    /// Rotate keys: `jwt`, `x509` (the signing intermediate) or `root` (operator).
    Rotate(RotateArgs),
    /// List signing keys, or revoke one in an emergency (operator).
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Owners of identities: deactivate one who left, list them (operator).
    #[command(subcommand)]
    Owner(OwnerCmd),
    /// The governance report: inventory, findings, programme metrics (operator).
    Report(ReportArgs),
    /// Look up issued credentials in the ledger (operator).
    #[command(subcommand)]
    Credential(CredentialCmd),
    /// Read and check the audit log (operator).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Approve an approval-gated scope for an identity, for a limited time (operator).
    Approve(operator::ApproveArgs),
    /// List or end approvals (operator).
    #[command(subcommand)]
    Approvals(operator::ApprovalsCmd),
    /// Cedar policies: check files offline, or reload the broker's (operator).
    #[command(subcommand)]
    Policy(operator::PolicyCmd),
    /// Operator credentials with a role: admin, operator, auditor, revoker (operator).
    #[command(subcommand, name = "operator")]
    OperatorCred(operator::OperatorCmd),
    /// Show which operator and role the current credential is.
    Whoami {
        #[command(flatten)]
        conn: Conn,
    },
    /// Attest (join token, OIDC token, or Unix peer credentials over the broker's socket) and
    /// write the workload's credentials to files.
    Fetch(FetchArgs),
    /// Measure issuance throughput and latency.
    Bench(BenchCmd),
}

/// `sigil bench`: the bench's own flags, and which broker (none: an embedded one).
#[derive(Debug, Args)]
pub struct BenchCmd {
    #[command(flatten)]
    args: sigil_bench::BenchArgs,
    #[command(flatten)]
    conn: Conn,
}

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
    /// Name of the first operator.
    #[arg(long, default_value = "admin")]
    pub operator: String,
    /// Lifetime of the first operator credential.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    pub operator_ttl: Duration,
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
}

/// `sigil dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where to keep the dev broker's data.
    #[arg(long, default_value = ".sigil-dev")]
    pub data_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// HTTP listen address, or `off`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_listen: String,
}

/// `sigil identity ...`.
#[derive(Debug, Subcommand)]
pub enum IdentityCmd {
    /// Register an identity.
    Create(operator::CreateArgs),
    /// List identities.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one identity (by id or SPIFFE ID).
    Show {
        /// Identity id or SPIFFE ID.
        identity: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Change an identity's owner, purpose, labels, selectors, entitlements or lifetime.
    Update(operator::UpdateArgs),
    /// Refuse all minting for an identity until resumed.
    Suspend(operator::StatusArgs),
    /// Resume a suspended identity.
    Resume(operator::StatusArgs),
    /// Retire an identity for good (revokes everything it holds).
    Retire(operator::RetireArgs),
    /// Extend an identity's life, vouching that it is still needed.
    Recertify {
        /// Identity id or SPIFFE ID.
        identity: String,
        /// New lifetime from now (default: the broker's identity lifetime, 90d).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        lifetime: Option<Duration>,
        /// Why it is still needed (recorded with who vouched).
        #[arg(long, default_value = "")]
        reason: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil join-token ...`.
#[derive(Debug, Subcommand)]
pub enum JoinTokenCmd {
    /// Create a one-time join token; it is printed once, on the last line.
    Create {
        /// The identity (SPIFFE ID or id) the token attests as.
        #[arg(long, alias = "identity")]
        spiffe_id: String,
        /// Lifetime.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil owner ...`.
#[derive(Debug, Subcommand)]
pub enum OwnerCmd {
    /// Flag every identity this person or team owns until it is reassigned.
    Deactivate {
        /// The owner's name, as identities spell it.
        name: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Undo a deactivation.
    Activate {
        /// The owner's name.
        name: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Every owner with the identities they own.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Unused this long counts as an orphan / excess privilege (default: [governance]).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub unused_after: Option<Duration>,
    /// Report identities expiring within this.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub expiring_within: Option<Duration>,
    /// Report identities whose max TTL is above this.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_ttl_policy: Option<Duration>,
    /// Print JSON (for tools).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil revoke ...`.
#[derive(Debug, Subcommand)]
pub enum RevokeCmd {
    /// Revoke one certificate (serial) or JWT-SVID (jti).
    Credential {
        /// Serial (hex) or jti.
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke everything an identity holds (its generation moves on).
    Identity {
        /// Identity id or SPIFFE ID.
        identity: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        /// Also suspend it, so it cannot get new credentials until resumed.
        #[arg(long)]
        suspend: bool,
        /// Show what would be revoked; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil leak`.
#[derive(Debug, Args)]
pub struct LeakArgs {
    /// A file holding the leaked JWT or PEM certificate, or `-` for standard input.
    pub file: String,
    /// Why (recorded in the incident).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Show the blast radius; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// `jwt`, `x509` or `root`.
    pub kind: String,
    /// Finish at once instead of publishing the next key first (verifiers may meet the new
    /// key before their next bundle refresh; watch streams carry it immediately).
    #[arg(long)]
    pub now: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// List signing keys and their rotation state.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Emergency: withdraw a JWT key or intermediate; a new one takes over at once and
    /// everything the old one signed stops verifying.
    Revoke {
        /// Key id (or a CA's key identifier).
        key_id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil credential ...`.
#[derive(Debug, Subcommand)]
pub enum CredentialCmd {
    /// Show the ledger record of a serial number (hex) or JWT id.
    Show {
        /// Serial or jti.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain; names the first bad entry.
    Verify {
        /// Read the store file directly instead of asking the broker: for a stopped broker's
        /// data dir or a copy of one (needs the master key).
        #[arg(long)]
        offline: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print entries as JSON lines.
    Export {
        /// First sequence number.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Only entries since this time: RFC 3339 (2026-11-22T10:00:00Z) or a duration ago (1h).
        #[arg(long)]
        since: Option<String>,
        /// Only entries about this identity (id or SPIFFE ID).
        #[arg(long)]
        identity: Option<String>,
        /// Only entries whose action starts with this (e.g. `jwt.mint`, `identity.`).
        #[arg(long)]
        action: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the newest entries; with --follow, keep printing new ones as they are written.
    Tail {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        /// Keep going.
        #[arg(short, long)]
        follow: bool,
        /// Only entries about this identity.
        #[arg(long)]
        identity: Option<String>,
        /// Only entries whose action starts with this.
        #[arg(long)]
        action: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(a) => init(a).await,
        Command::Serve(a) => serve(a).await,
        Command::Dev(a) => crate::dev::run(a).await,
        Command::Identity(c) => operator::identity(c).await,
        Command::JoinToken(c) => operator::join_token(c).await,
        Command::Credential(c) => operator::credential(c).await,
        Command::Owner(c) => operator::owner(c).await,
        Command::Report(a) => operator::report(a).await,
        Command::Revoke(c) => operator::revoke(c).await,
        Command::Leak(a) => operator::leak(a).await,
        Command::Rotate(a) => operator::rotate(a).await,
        Command::Keys(c) => operator::keys(c).await,
        Command::Audit(c) => operator::audit(c).await,
        Command::Approve(a) => operator::approve(a).await,
        Command::Approvals(c) => operator::approvals(c).await,
        Command::Policy(c) => operator::policy(c).await,
        Command::OperatorCred(c) => operator::operator_cred(c).await,
        Command::Whoami { conn } => operator::whoami(conn).await,
        Command::Fetch(a) => fetch::run(a).await,
        Command::Bench(b) => {
            let external = if b.conn.broker.is_some() || b.conn.data_dir.is_some() {
                Some(b.conn.for_bench()?)
            } else {
                None
            };
            sigil_bench::run(b.args, external).await
        }
    }
}

/// Parses `ADDR` or `off`.
pub fn parse_http_listen(v: &str) -> Result<Option<SocketAddr>> {
    if v.eq_ignore_ascii_case("off") || v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Ok(Some(v.parse().with_context(|| {
        format!("--http-listen {v:?} is not an address (or `off`)")
    })?))
}

async fn init(a: InitArgs) -> Result<()> {
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

/// Loads the config of a data dir and applies flag overrides.
pub fn load_config(
    data_dir: &Path,
    listen: Option<SocketAddr>,
    http_listen: Option<&str>,
) -> Result<sigil_broker::config::Config> {
    let store = sigil_broker::store::StoreConfig::in_data_dir(data_dir);
    if !store.exists() {
        bail!(
            "{} is not a Sigil data dir (no {}); run `sigil init --data-dir {} --trust-domain ...` first",
            data_dir.display(),
            store.describe(),
            data_dir.display()
        );
    }
    let mut cfg = sigil_broker::config::Config::load(data_dir)?;
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if let Some(h) = http_listen {
        cfg.http_listen = parse_http_listen(h)?;
    }
    Ok(cfg)
}

async fn serve(a: ServeArgs) -> Result<()> {
    let mut cfg = load_config(&a.data_dir, a.listen, a.http_listen.as_deref())?;
    if let Some(p) = a.workload_socket {
        cfg.workload_socket = Some(p);
    }
    let master = sigil_broker::server::load_master_key(&cfg)?;
    let running =
        sigil_broker::server::start(cfg, master, sigil_broker::server::StartOptions::default())
            .await?;
    println!("sigil broker listening on {}", running.url());
    if let Some(h) = running.http_url() {
        println!("sigil http listening on {h}");
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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
