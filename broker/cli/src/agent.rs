//! `sigil agent`: keeps a workload's credentials in files, for workloads not written in Rust
//! (the job spiffe-helper, Vault Agent and `step ca renew --daemon` do).
//!
//! It attests with what it was given (a join-token file, an OIDC token file re-read on every
//! attestation, or the broker's Unix socket), writes `svid.pem` (leaf then chain), `svid.key`
//! (0600), `bundle.pem`, `bundle.json` and one JWT-SVID file per audience, each atomically,
//! then keeps them current with the SDK's [`Source`]: renewal at about half the lifetime over
//! mTLS, re-attestation when renewal is refused, the Watch stream for revocations and bundle
//! changes. After every change it runs a command or signals a process. While the broker is
//! away the files stay as they are (a valid credential is never deleted) and renewal retries
//! with capped backoff. `--once` writes everything and exits (an init container).
//!
//! Layout: [`AgentArgs`] (flags, or the same keys in a TOML file) → [`Plan`] (checked,
//! typed) → [`run`]: start the source, [`Writer::write`] the files, follow the source, and
//! [`Hook::fire`] after each change; [`health`] serves `/healthz`, `/readyz` and `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use serde::Deserialize;
use sigil_sdk::evidence::{EvidenceSource, JoinTokenFile, OidcTokenFile, UnixEvidence};
use sigil_sdk::{
    ClientConfig, JwtRequest, Source, SourceConfig, SourceEvent, SvidOptions, WorkloadClient,
};

use sigil_broker::fsutil::write_atomic_owned;

/// `sigil agent`: every key can be a flag or a key of the `--config` TOML file (flags win).
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentArgs {
    /// A TOML file with any of the keys below (snake_case: `broker`, `trust_bundle`,
    /// `join_token_file`, `audiences`, `exec`, ...); flags override it.
    #[arg(long, env = "SIGIL_AGENT_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Broker URL, several separated by commas (failover), or the broker's Unix socket
    /// (unix:///run/sigil/workload.sock: attests by this process's uid and binary).
    #[arg(long, env = "SIGIL_BROKER")]
    pub broker: Option<String>,
    /// The trust bundle (PEM) an operator gave you, to reach the broker the first time.
    #[arg(long, env = "SIGIL_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// A file holding a join token; read at each attestation, so an operator can drop a new
    /// one there for re-attestation.
    #[arg(long, env = "SIGIL_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// An OIDC token file (a Kubernetes projected service-account token, rotated by the
    /// kubelet), read afresh at each attestation.
    #[arg(
        long,
        env = "SIGIL_OIDC_TOKEN_FILE",
        conflicts_with = "join_token_file"
    )]
    pub oidc_token_file: Option<PathBuf>,
    /// The identity wanted, when the evidence matches several.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Directory for the files (created 0700, owned by --owner-uid/--owner-gid when given).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep a JWT-SVID for this audience in a file (repeatable).
    #[arg(long = "audience")]
    pub audiences: Vec<String>,
    /// Scope to ask for in every JWT-SVID (repeatable).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// DNS name to include in the certificate (repeatable).
    #[arg(long = "dns")]
    pub dns_names: Vec<String>,
    /// X.509-SVID lifetime to ask for, e.g. `1h` (clamped to the identity's maximum).
    #[arg(long)]
    pub ttl: Option<String>,
    /// File name of the certificate chain (leaf first) [default: svid.pem].
    #[arg(long)]
    pub cert_file_name: Option<String>,
    /// File name of the private key [default: svid.key].
    #[arg(long)]
    pub key_file_name: Option<String>,
    /// File name of the CA bundle (PEM) [default: bundle.pem].
    #[arg(long)]
    pub bundle_file_name: Option<String>,
    /// File name of the SPIFFE bundle (JSON: CA roots and JWT keys) [default: bundle.json].
    #[arg(long)]
    pub jwt_bundle_file_name: Option<String>,
    /// File name of each JWT-SVID; `{audience}` is replaced [default: jwt-{audience}.txt].
    #[arg(long)]
    pub jwt_file_name: Option<String>,
    /// Mode of the certificate and bundle files, octal [default: 0644].
    #[arg(long)]
    pub file_mode: Option<String>,
    /// Mode of the private key and JWT-SVID files, octal [default: 0600].
    #[arg(long)]
    pub key_file_mode: Option<String>,
    /// Owner (uid) of the files and the directory, e.g. the workload's user.
    #[arg(long)]
    pub owner_uid: Option<u32>,
    /// Group (gid) of the files and the directory.
    #[arg(long)]
    pub owner_gid: Option<u32>,
    /// Run this command (with /bin/sh -c) after every change of the files, e.g.
    /// `nginx -s reload`; it sees SIGIL_SVID_SERIAL and SIGIL_SVID_EXPIRES_AT.
    #[arg(long)]
    pub exec: Option<String>,
    /// Send this signal (HUP, USR1, ...) after every change to the process in --pid-file,
    /// or to every process named --signal-process.
    #[arg(long)]
    pub signal: Option<String>,
    /// The file holding the pid to signal.
    #[arg(long, requires = "signal", conflicts_with = "signal_process")]
    pub pid_file: Option<PathBuf>,
    /// Signal every process with this name (its command name, as `pkill -x` matches it)
    /// instead of the one in --pid-file.
    #[arg(long, requires = "signal")]
    pub signal_process: Option<String>,
    /// Write the files once and exit (0 when written; non-zero with the reason otherwise):
    /// for init containers and scripts.
    #[arg(long)]
    pub once: bool,
    /// Serve /healthz, /readyz (ready once valid credentials are written) and /metrics on
    /// this address, e.g. 127.0.0.1:8081.
    #[arg(long)]
    pub health_listen: Option<String>,
}

impl AgentArgs {
    /// These flags over the keys of `file` (a flag given wins; lists given replace).
    fn over(self, file: AgentArgs) -> AgentArgs {
        fn list(a: Vec<String>, b: Vec<String>) -> Vec<String> {
            if a.is_empty() { b } else { a }
        }
        AgentArgs {
            config: self.config,
            broker: self.broker.or(file.broker),
            trust_bundle: self.trust_bundle.or(file.trust_bundle),
            join_token_file: self.join_token_file.or(file.join_token_file),
            oidc_token_file: self.oidc_token_file.or(file.oidc_token_file),
            spiffe_id: self.spiffe_id.or(file.spiffe_id),
            out: self.out.or(file.out),
            audiences: list(self.audiences, file.audiences),
            scopes: list(self.scopes, file.scopes),
            dns_names: list(self.dns_names, file.dns_names),
            ttl: self.ttl.or(file.ttl),
            cert_file_name: self.cert_file_name.or(file.cert_file_name),
            key_file_name: self.key_file_name.or(file.key_file_name),
            bundle_file_name: self.bundle_file_name.or(file.bundle_file_name),
            jwt_bundle_file_name: self.jwt_bundle_file_name.or(file.jwt_bundle_file_name),
            jwt_file_name: self.jwt_file_name.or(file.jwt_file_name),
            file_mode: self.file_mode.or(file.file_mode),
            key_file_mode: self.key_file_mode.or(file.key_file_mode),
            owner_uid: self.owner_uid.or(file.owner_uid),
            owner_gid: self.owner_gid.or(file.owner_gid),
            exec: self.exec.or(file.exec),
            signal: self.signal.or(file.signal),
            pid_file: self.pid_file.or(file.pid_file),
            signal_process: self.signal_process.or(file.signal_process),
            once: self.once || file.once,
            health_listen: self.health_listen.or(file.health_listen),
        }
    }
}

/// What the agent does, checked.
#[derive(Debug)]
pub(crate) struct Plan {
    broker: String,
    trust_bundle: PathBuf,
    evidence: Evidence,
    svid: SvidOptions,
    jwts: Vec<JwtRequest>,
    files: Files,
    hook: Hook,
    once: bool,
    health_listen: Option<SocketAddr>,
}

#[derive(Debug)]
enum Evidence {
    JoinTokenFile(PathBuf),
    OidcTokenFile(PathBuf),
    Unix,
}

/// Where and how the files are written.
#[derive(Debug, Clone)]
struct Files {
    dir: PathBuf,
    cert: String,
    key: String,
    bundle: String,
    jwt_bundle: String,
    jwt: String,
    mode: u32,
    key_mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
}

/// What runs after the files change.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hook {
    exec: Option<String>,
    signal: Option<(rustix::process::Signal, SignalTarget)>,
}

/// Which process(es) the signal goes to.
#[derive(Debug, Clone)]
enum SignalTarget {
    /// The pid in this file (read again each time: the process may have restarted).
    PidFile(PathBuf),
    /// Every process with this command name.
    Name(String),
}

fn parse_mode(v: &str, key: &str) -> Result<u32> {
    let m = u32::from_str_radix(v.trim_start_matches("0o"), 8)
        .map_err(|_| anyhow!("{key} {v:?} is not an octal file mode (e.g. 0640)"))?;
    if m > 0o777 {
        bail!("{key} {v:?}: a file mode is at most 0777");
    }
    Ok(m)
}

fn parse_signal(v: &str) -> Result<rustix::process::Signal> {
    use rustix::process::Signal;
    let name = v.trim().to_ascii_uppercase();
    Ok(match name.trim_start_matches("SIG") {
        "HUP" => Signal::HUP,
        "INT" => Signal::INT,
        "QUIT" => Signal::QUIT,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "TERM" => Signal::TERM,
        "WINCH" => Signal::WINCH,
        _ => bail!("--signal {v:?}: use one of HUP, INT, QUIT, USR1, USR2, TERM, WINCH"),
    })
}

fn file_name(v: Option<String>, default: &str, key: &str) -> Result<String> {
    let n = v.unwrap_or_else(|| default.to_owned());
    if n.is_empty() || n.contains('/') || n == "." || n == ".." {
        bail!("{key} {n:?} must be a plain file name (no '/')");
    }
    Ok(n)
}

impl Plan {
    /// Reads `--config` (if any), lays the flags over it and checks everything.
    pub(crate) fn from_args(a: AgentArgs) -> Result<Plan> {
        let a = match &a.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading agent config {}", path.display()))?;
                let file: AgentArgs = toml::from_str(&text)
                    .map_err(|e| anyhow!("agent config {}: {e}", path.display()))?;
                a.over(file)
            }
            None => a,
        };
        let broker = a
            .broker
            .ok_or_else(|| anyhow!("no broker: pass --broker URL (or `broker` in --config)"))?;
        let trust_bundle = a.trust_bundle.ok_or_else(|| {
            anyhow!("no trust bundle: pass --trust-bundle FILE (or `trust_bundle` in --config)")
        })?;
        let dir = a
            .out
            .ok_or_else(|| anyhow!("no output directory: pass --out DIR (or `out` in --config)"))?;
        let evidence = match (a.join_token_file, a.oidc_token_file) {
            (Some(_), Some(_)) => {
                bail!("give either join_token_file or oidc_token_file, not both")
            }
            (Some(f), None) => Evidence::JoinTokenFile(f),
            (None, Some(f)) => Evidence::OidcTokenFile(f),
            (None, None) if broker.starts_with("unix:") => Evidence::Unix,
            (None, None) => bail!(
                "no evidence: pass --join-token-file, --oidc-token-file, or --broker unix:///PATH to attest by this process"
            ),
        };
        let ttl = a
            .ttl
            .as_deref()
            .map(|t| humantime::parse_duration(t).map_err(|e| anyhow!("ttl {t:?}: {e}")))
            .transpose()?;
        let jwts = a
            .audiences
            .iter()
            .map(|aud| {
                let mut r = JwtRequest::audience(aud.clone());
                r.scopes = a.scopes.clone();
                r
            })
            .collect();
        let jwt = a
            .jwt_file_name
            .unwrap_or_else(|| "jwt-{audience}.txt".to_owned());
        if !jwt.contains("{audience}") && a.audiences.len() > 1 {
            bail!("jwt_file_name {jwt:?} needs {{audience}} when there are several audiences");
        }
        if jwt.contains('/') {
            bail!("jwt_file_name {jwt:?} must be a plain file name (no '/')");
        }
        let files = Files {
            dir,
            cert: file_name(a.cert_file_name, "svid.pem", "cert_file_name")?,
            key: file_name(a.key_file_name, "svid.key", "key_file_name")?,
            bundle: file_name(a.bundle_file_name, "bundle.pem", "bundle_file_name")?,
            jwt_bundle: file_name(
                a.jwt_bundle_file_name,
                "bundle.json",
                "jwt_bundle_file_name",
            )?,
            jwt,
            mode: parse_mode(a.file_mode.as_deref().unwrap_or("0644"), "file_mode")?,
            key_mode: parse_mode(
                a.key_file_mode.as_deref().unwrap_or("0600"),
                "key_file_mode",
            )?,
            uid: a.owner_uid,
            gid: a.owner_gid,
        };
        let signal = match (a.signal, a.pid_file, a.signal_process) {
            (Some(s), Some(p), None) => Some((parse_signal(&s)?, SignalTarget::PidFile(p))),
            (Some(s), None, Some(n)) => {
                if n.is_empty() || n.contains('/') {
                    bail!("signal_process {n:?}: a process name, without a path");
                }
                Some((parse_signal(&s)?, SignalTarget::Name(n)))
            }
            (None, None, None) => None,
            (Some(_), None, None) => {
                bail!("signal needs pid_file or signal_process: which process to signal")
            }
            (Some(_), Some(_), Some(_)) => {
                bail!("pid_file and signal_process: give one of them")
            }
            _ => bail!("pid_file and signal_process need signal: which signal to send"),
        };
        let health_listen = a
            .health_listen
            .as_deref()
            .map(|h| {
                h.parse().map_err(|_| {
                    anyhow!("health_listen {h:?} is not an address (e.g. 127.0.0.1:8081)")
                })
            })
            .transpose()?;
        Ok(Plan {
            broker,
            trust_bundle,
            evidence,
            svid: SvidOptions {
                ttl,
                dns_names: a.dns_names,
                spiffe_id: a.spiffe_id,
            },
            jwts,
            files,
            hook: Hook {
                exec: a.exec,
                signal,
            },
            once: a.once,
            health_listen,
        })
    }
}

/// What the agent reports on `/metrics` and `/readyz`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    ready: AtomicBool,
    expires_at: AtomicI64,
    writes: AtomicU64,
    hook_runs: AtomicU64,
    hook_failures: AtomicU64,
    renewal_failures: AtomicU64,
    revocations: AtomicU64,
}

impl Stats {
    /// Ready: credentials written and the certificate not expired.
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.expires_at.load(Ordering::Relaxed) > now()
    }

    fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: String| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        };
        metric(
            "sigil_agent_ready",
            "gauge",
            "1 when valid credentials are written.",
            u8::from(self.ready()).to_string(),
        );
        metric(
            "sigil_agent_svid_expiry_timestamp_seconds",
            "gauge",
            "When the X.509-SVID in the files expires (Unix seconds).",
            self.expires_at.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "sigil_agent_writes_total",
            "counter",
            "Times the credential files were written (first write and every change).",
            self.writes.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "sigil_agent_hook_runs_total",
            "counter",
            "Times the exec command ran or the signal was sent.",
            self.hook_runs.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "sigil_agent_hook_failures_total",
            "counter",
            "Hook runs that failed (non-zero exit, no such process).",
            self.hook_failures.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "sigil_agent_renewal_failures_total",
            "counter",
            "Renewal attempts that failed (the files keep the current credential).",
            self.renewal_failures.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "sigil_agent_revocations_total",
            "counter",
            "Revocations of this workload's credentials the broker announced.",
            self.revocations.load(Ordering::Relaxed).to_string(),
        );
        out
    }
}

/// Writes the files, remembering what it wrote so unchanged files are left alone.
#[derive(Debug)]
struct Writer {
    files: Files,
    written: BTreeMap<String, Vec<u8>>,
}

impl Writer {
    fn put(&mut self, name: &str, bytes: &[u8], mode: u32) -> Result<bool> {
        if self.written.get(name).is_some_and(|b| b == bytes) {
            return Ok(false);
        }
        let p = self.files.dir.join(name);
        write_atomic_owned(&p, bytes, mode, self.files.uid, self.files.gid)
            .with_context(|| format!("writing {}", p.display()))?;
        self.written.insert(name.to_owned(), bytes.to_vec());
        Ok(true)
    }

    /// Writes what changed; true when anything did.
    async fn write(&mut self, source: &Source, jwts: &[JwtRequest], stats: &Stats) -> Result<bool> {
        let svid = source.x509_svid().map_err(|e| anyhow!("{e}"))?;
        let mut changed = false;
        // Key first: a reader that sees the new certificate finds its key already in place.
        let key = svid.private_key_pem();
        changed |= self.put(
            &self.files.key.clone(),
            key.expose_secret(),
            self.files.key_mode,
        )?;
        changed |= self.put(
            &self.files.cert.clone(),
            svid.cert_chain_pem().as_bytes(),
            self.files.mode,
        )?;
        if let Some(b) = source.bundle() {
            changed |= self.put(
                &self.files.bundle.clone(),
                b.x509_pem().as_bytes(),
                self.files.mode,
            )?;
            changed |= self.put(
                &self.files.jwt_bundle.clone(),
                b.json.as_bytes(),
                self.files.mode,
            )?;
        }
        for req in jwts {
            let aud = &req.audiences[0];
            match source.jwt_svid(req).await {
                Ok(j) => {
                    let name = self.files.jwt.replace("{audience}", &file_safe(aud));
                    changed |= self.put(
                        &name,
                        format!("{}\n", j.token.expose_secret()).as_bytes(),
                        self.files.key_mode,
                    )?;
                }
                // The file keeps the last token (still valid, or the next try replaces it).
                Err(e) => tracing::warn!(audience = %aud, error = %e, "JWT-SVID not renewed"),
            }
        }
        stats.expires_at.store(svid.expires_at, Ordering::Relaxed);
        if changed {
            stats.writes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                spiffe_id = %svid.spiffe_id,
                serial = %svid.serial,
                expires_at = %sigil_broker::clock::rfc3339(svid.expires_at),
                dir = %self.files.dir.display(),
                "credentials written"
            );
        }
        Ok(changed)
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn file_safe(aud: &str) -> String {
    aud.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Hook {
    /// Runs the command and/or sends the signal; failures are logged and counted, never
    /// fatal (the files are already in place).
    async fn fire(&self, source: &Source, stats: &Stats) {
        if self.exec.is_none() && self.signal.is_none() {
            return;
        }
        stats.hook_runs.fetch_add(1, Ordering::Relaxed);
        let (serial, expires) = match source.x509_svid() {
            Ok(s) => (s.serial.clone(), s.expires_at.to_string()),
            Err(_) => (String::new(), String::new()),
        };
        if let Some(cmd) = &self.exec {
            let run = tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(cmd)
                .env("SIGIL_SVID_SERIAL", &serial)
                .env("SIGIL_SVID_EXPIRES_AT", &expires)
                .kill_on_drop(true)
                .status();
            match tokio::time::timeout(Duration::from_secs(60), run).await {
                Ok(Ok(s)) if s.success() => {}
                Ok(Ok(s)) => {
                    stats.hook_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(command = %cmd, status = %s, "the exec command failed");
                }
                Ok(Err(e)) => {
                    stats.hook_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(command = %cmd, error = %e, "the exec command could not run");
                }
                Err(_) => {
                    stats.hook_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(command = %cmd, "the exec command ran over 60s and was killed");
                }
            }
        }
        if let Some((sig, target)) = &self.signal {
            let sent = match target {
                SignalTarget::PidFile(f) => send_signal(*sig, f),
                SignalTarget::Name(n) => signal_by_name(*sig, n).map(|_| ()),
            };
            if let Err(e) = sent {
                stats.hook_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target = ?target, error = %e, "signal not sent");
            }
        }
    }
}

fn send_signal(sig: rustix::process::Signal, pid_file: &Path) -> Result<()> {
    let text = std::fs::read_to_string(pid_file)
        .with_context(|| format!("reading {}", pid_file.display()))?;
    let raw: i32 = text
        .trim()
        .parse()
        .map_err(|_| anyhow!("{} holds {:?}, not a pid", pid_file.display(), text.trim()))?;
    let pid = rustix::process::Pid::from_raw(raw)
        .filter(|_| raw > 0)
        .ok_or_else(|| {
            anyhow!(
                "{} holds pid {raw}, which cannot be signalled",
                pid_file.display()
            )
        })?;
    rustix::process::kill_process(pid, sig).with_context(|| format!("signalling pid {raw}"))?;
    Ok(())
}

/// Sends `sig` to every process (but this one) whose command name is `name`, as `pkill -x`
/// does: the kernel keeps the first 15 bytes of a name, so a longer `name` is compared by
/// those. Returns how many were signalled; none is an error.
fn signal_by_name(sig: rustix::process::Signal, name: &str) -> Result<usize> {
    let want = &name.as_bytes()[..name.len().min(15)];
    let me = std::process::id();
    let mut sent = 0;
    let mut refused = None;
    for entry in std::fs::read_dir("/proc")
        .context("reading /proc")?
        .flatten()
    {
        let Some(raw) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if raw as u32 == me {
            continue;
        }
        // A process may exit between the listing and the read: skip it.
        let Ok(comm) = std::fs::read(entry.path().join("comm")) else {
            continue;
        };
        if comm.strip_suffix(b"\n").unwrap_or(&comm) != want {
            continue;
        }
        let Some(pid) = rustix::process::Pid::from_raw(raw) else {
            continue;
        };
        match rustix::process::kill_process(pid, sig) {
            Ok(()) => sent += 1,
            Err(e) => refused = Some(format!("pid {raw}: {e}")),
        }
    }
    match (sent, refused) {
        (0, Some(why)) => bail!("no process named {name:?} could be signalled ({why})"),
        (0, None) => bail!("no process is named {name:?}"),
        (n, _) => Ok(n),
    }
}

fn evidence(e: &Evidence) -> Arc<dyn EvidenceSource> {
    match e {
        Evidence::JoinTokenFile(p) => Arc::new(JoinTokenFile::new(p.clone())),
        Evidence::OidcTokenFile(p) => Arc::new(OidcTokenFile::new(p.clone())),
        Evidence::Unix => Arc::new(UnixEvidence),
    }
}

/// Attests and starts the source: once for `--once`, else until it works (capped backoff),
/// or until `stop`.
async fn start(plan: &Plan, stop: &tokio::sync::watch::Receiver<bool>) -> Result<Option<Source>> {
    let bundle = std::fs::read(&plan.trust_bundle)
        .with_context(|| format!("reading trust bundle {}", plan.trust_bundle.display()))?;
    let mut delay = Duration::from_millis(500);
    loop {
        let client = WorkloadClient::new(ClientConfig::new(plan.broker.clone(), bundle.clone()))
            .map_err(|e| anyhow!("{e}"))?;
        let cfg = SourceConfig {
            svid: plan.svid.clone(),
            watch: !plan.once,
            ..SourceConfig::default()
        };
        match Source::start(client, evidence(&plan.evidence), cfg).await {
            Ok(s) => return Ok(Some(s)),
            Err(e) if plan.once => {
                return Err(anyhow::Error::new(e).context(format!("attesting to {}", plan.broker)));
            }
            Err(e) => {
                tracing::warn!(broker = %plan.broker, error = %e, retry_in = ?delay, "could not attest; the files stay as they are");
            }
        }
        let mut stop = stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(sigil_sdk_jitter(delay)) => {}
            _ = stop.wait_for(|s| *s) => return Ok(None),
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// `d` moved by up to ±10%, so agents restarted together do not retry in step.
fn sigil_sdk_jitter(d: Duration) -> Duration {
    let r = f64::from(sigil_pki::ids::random_bytes::<1>()[0]) / 255.0;
    d.mul_f64(0.9 + 0.2 * r)
}

/// Runs `sigil agent`.
pub(crate) async fn run(a: AgentArgs) -> Result<()> {
    let plan = Plan::from_args(a)?;
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::serve::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let health = match plan.health_listen {
        Some(addr) => Some(health::serve(addr, stats.clone(), stop.clone()).await?),
        None => None,
    };
    sigil_broker::fsutil::create_private_dir(&plan.files.dir)
        .with_context(|| format!("creating {}", plan.files.dir.display()))?;
    if plan.files.uid.is_some() || plan.files.gid.is_some() {
        std::os::unix::fs::chown(&plan.files.dir, plan.files.uid, plan.files.gid)
            .with_context(|| format!("chown {}", plan.files.dir.display()))?;
    }
    let Some(source) = start(&plan, &stop).await? else {
        return Ok(());
    };
    let mut writer = Writer {
        files: plan.files.clone(),
        written: BTreeMap::new(),
    };
    writer.write(&source, &plan.jwts, &stats).await?;
    stats.ready.store(true, Ordering::Relaxed);
    if plan.once {
        source.shutdown().await;
        println!("credentials written to {}", plan.files.dir.display());
        return Ok(());
    }
    println!(
        "sigil agent: credentials in {}, kept current from {}",
        plan.files.dir.display(),
        plan.broker
    );
    follow(&plan, &source, &mut writer, &stats, stop).await;
    source.shutdown().await;
    if let Some(h) = health {
        let _ = h.await;
    }
    Ok(())
}

/// Rewrites the files whenever the source has something new, and fires the hook once per
/// change, until `stop`.
async fn follow(
    plan: &Plan,
    source: &Source,
    writer: &mut Writer,
    stats: &Stats,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut updates = source.updates();
    let mut events = source.events();
    // JWT-SVIDs are renewed by the source on their own schedule; look at least this often.
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_revoked = None;
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = updates.changed() => if r.is_err() { return },
            ev = events.recv() => match ev {
                Ok(SourceEvent::RenewalFailed { error, retry_in }) => {
                    stats.renewal_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, ?retry_in, "renewal failed; the files keep the current credential");
                    continue;
                }
                Ok(SourceEvent::Revoked { reason }) => {
                    // One revocation arrives as several notices (certificate, identity, ...):
                    // count and log it once.
                    if last_revoked.is_none_or(|t: tokio::time::Instant| t.elapsed() > Duration::from_secs(1)) {
                        stats.revocations.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%reason, "the broker revoked this workload's credentials; fetching new ones");
                    }
                    last_revoked = Some(tokio::time::Instant::now());
                    continue;
                }
                Ok(SourceEvent::Expired { at }) => {
                    tracing::error!(expired_at = %sigil_broker::clock::rfc3339(at), "the certificate expired without a replacement");
                    continue;
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => {}
        }
        // One change often comes as several events (re-attested, renewed, bundle): let them
        // settle so the hook runs once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        updates.borrow_and_update();
        while events.try_recv().is_ok() {}
        match writer.write(source, &plan.jwts, stats).await {
            Ok(changed) => {
                last_error = None;
                if changed {
                    plan.hook.fire(source, stats).await;
                }
            }
            // Said once per distinct problem, not on every look.
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(error = %msg, "could not write the credential files");
                    last_error = Some(msg);
                }
            }
        }
    }
}

/// `/healthz`, `/readyz` and `/metrics`.
mod health {
    use super::*;
    use axum::http::StatusCode;
    use axum::routing::get;

    pub(super) async fn serve(
        addr: SocketAddr,
        stats: Arc<Stats>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--health-listen)"))?;
        let s1 = stats.clone();
        let s2 = stats;
        let app = axum::Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move || async move {
                    if s1.ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no valid credentials written yet\n",
                        )
                    }
                }),
            )
            .route(
                "/metrics",
                get(move || async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        s2.prometheus(),
                    )
                }),
            );
        println!("sigil agent health on http://{}", listener.local_addr()?);
        Ok(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        }))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_signal_goes_to_every_process_of_a_name_and_none_is_an_error() {
        // A process with a name no other has: a copy of sleep(1) under that name.
        let dir = tempfile::tempdir().unwrap();
        let name = format!("sgl-{}", std::process::id());
        let bin = dir.path().join(&name);
        std::fs::copy("/bin/sleep", &bin).unwrap();
        let mut a = std::process::Command::new(&bin).arg("30").spawn().unwrap();
        let mut b = std::process::Command::new(&bin).arg("30").spawn().unwrap();
        // Wait until both have exec'd (their comm is the new name).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let named = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        };
        while !(named(a.id()) && named(b.id())) {
            assert!(std::time::Instant::now() < deadline, "the copies start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let n = signal_by_name(rustix::process::Signal::TERM, &name).unwrap();
        assert_eq!(n, 2);
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(a.wait().unwrap().signal(), Some(15));
        assert_eq!(b.wait().unwrap().signal(), Some(15));
        let e = signal_by_name(rustix::process::Signal::HUP, &name).unwrap_err();
        assert!(e.to_string().contains("no process is named"), "{e}");
    }
    use super::*;

    #[test]
    fn flags_override_the_file_and_bad_values_are_named() {
        let file: AgentArgs = toml::from_str(
            "broker = \"https://a:8443\"\ntrust_bundle = \"/b.pem\"\njoin_token_file = \"/t\"\nout = \"/o\"\naudiences = [\"db\"]\nfile_mode = \"0640\"\n",
        )
        .unwrap();
        let flags = AgentArgs {
            broker: Some("https://b:8443".into()),
            ..Default::default()
        };
        let merged = flags.over(file);
        assert_eq!(merged.broker.as_deref(), Some("https://b:8443"));
        assert_eq!(merged.audiences, vec!["db".to_owned()]);
        let plan = Plan::from_args(merged.clone()).unwrap();
        assert_eq!(plan.files.mode, 0o640);
        assert_eq!(plan.files.key_mode, 0o600);
        assert_eq!(plan.files.jwt, "jwt-{audience}.txt");

        // The example in deploy/ is a valid agent config.
        let example: AgentArgs = toml::from_str(include_str!("../../../deploy/agent.toml"))
            .unwrap_or_else(|e| panic!("deploy/agent.toml: {e}"));
        Plan::from_args(example).unwrap();
        // And so is the one in the Kubernetes example's ConfigMap (a YAML block scalar).
        let yaml = include_str!("../../../deploy/kubernetes/example/20-configmap.yaml");
        let block: String = yaml
            .lines()
            .skip_while(|l| l.trim() != "agent.toml: |")
            .skip(1)
            .take_while(|l| l.trim().is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.get(4..).unwrap_or_default()))
            .collect();
        assert!(
            block.contains("broker"),
            "an agent.toml block in the ConfigMap"
        );
        let k8s: AgentArgs = toml::from_str(&block)
            .unwrap_or_else(|e| panic!("deploy/kubernetes/example/20-configmap.yaml: {e}"));
        Plan::from_args(k8s).unwrap();

        let e = toml::from_str::<AgentArgs>("brokr = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("brokr"), "{e}");
        for (bad, needle) in [
            (
                AgentArgs {
                    file_mode: Some("999".into()),
                    ..merged.clone()
                },
                "file_mode",
            ),
            (
                AgentArgs {
                    cert_file_name: Some("../x".into()),
                    ..merged.clone()
                },
                "cert_file_name",
            ),
            (
                AgentArgs {
                    signal: Some("BOOM".into()),
                    pid_file: Some("/p".into()),
                    ..merged.clone()
                },
                "--signal",
            ),
            (
                AgentArgs {
                    signal: Some("HUP".into()),
                    ..merged.clone()
                },
                "which process to signal",
            ),
            (
                AgentArgs {
                    signal: Some("HUP".into()),
                    signal_process: Some("/usr/sbin/nginx".into()),
                    ..merged.clone()
                },
                "without a path",
            ),
            (
                AgentArgs {
                    join_token_file: None,
                    ..merged.clone()
                },
                "no evidence",
            ),
            (
                AgentArgs {
                    out: None,
                    ..merged.clone()
                },
                "--out",
            ),
        ] {
            let e = Plan::from_args(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
