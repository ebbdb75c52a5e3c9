//! How operator commands (and `sigil bench` against a running broker) reach the broker: the
//! broker URL, its trust bundle and an operator credential, from `--data-dir` (which holds
//! `broker.url`, `bundle.pem` and `admin/`) or explicit flags and `SIGIL_*` variables.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use sigil_broker::config::{ADMIN_DIR, BROKER_URL_FILE, BUNDLE_FILE};
use sigil_proto::v1::admin_client::AdminClient;

/// How operator commands reach the broker.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Data dir of the broker (finds broker.url, bundle.pem and admin/ in it).
    #[arg(long, env = "SIGIL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Broker URL, e.g. https://127.0.0.1:8443.
    #[arg(long, env = "SIGIL_BROKER")]
    pub broker: Option<String>,
    /// Trust bundle (PEM) to verify the broker with.
    #[arg(long, env = "SIGIL_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// Operator certificate (PEM).
    #[arg(long, env = "SIGIL_ADMIN_CERT")]
    pub admin_cert: Option<PathBuf>,
    /// Operator key (PEM, mode 0600).
    #[arg(long, env = "SIGIL_ADMIN_KEY")]
    pub admin_key: Option<PathBuf>,
    /// A saved connection (`sigil profile add`); without this and without --data-dir, the
    /// current profile is used if there is one. Flags given beside it override its parts.
    #[arg(long, env = "SIGIL_PROFILE")]
    pub profile: Option<String>,
}

/// Where a command's connection comes from: paths, nothing read yet.
pub(crate) struct Paths {
    pub broker: String,
    pub bundle: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The profile used, if one was.
    pub profile: Option<String>,
}

/// Which broker (and trust bundle file) this command talks to, for error messages.
static TARGET: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Remembers the broker and bundle a command uses, so a failure can name them.
pub(crate) fn note_target(broker: &str, bundle: &Path, profile: Option<&str>) {
    let profile = profile
        .map(|p| format!(", profile {p}"))
        .unwrap_or_default();
    let _ = TARGET.set(format!(
        "broker {broker}, trust bundle {}{profile}",
        bundle.display()
    ));
}

/// The broker (and bundle file) this command talked to, if it talked to one.
pub fn target() -> Option<&'static str> {
    TARGET.get().map(String::as_str)
}

/// A connection resolved from [`Conn`]: everything read, nothing connected yet.
struct Resolved {
    broker: String,
    bundle_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: zeroize::Zeroizing<Vec<u8>>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

impl Conn {
    /// Resolves the broker URL, trust bundle and operator credential, and connects.
    pub fn connect(&self) -> Result<AdminClient<sigil_sdk::Failover>> {
        let r = self.resolve()?;
        Ok(sigil_sdk::connect_admin(
            &r.broker,
            &r.bundle_pem,
            &r.cert_pem,
            &r.key_pem,
        )?)
    }

    /// The broker `sigil bench` measures.
    pub(crate) fn for_bench(&self) -> Result<sigil_bench::External> {
        let r = self.resolve()?;
        Ok(sigil_bench::External {
            url: r.broker,
            bundle_pem: r.bundle_pem,
            admin_cert_pem: r.cert_pem,
            admin_key_pem: r.key_pem,
        })
    }

    /// The broker URL and the files to read: each from its flag (or `SIGIL_*` variable), else
    /// from `--profile`, else from `--data-dir`, else from the current profile.
    pub(crate) fn resolve_paths(&self) -> Result<Paths> {
        let explicit = self.profile.is_some();
        let profile = if explicit || self.data_dir.is_none() {
            crate::profile::find(self.profile.as_deref())?
        } else {
            None
        };
        let dir = if explicit {
            None
        } else {
            self.data_dir.as_deref()
        };
        let from_dir = |f: &dyn Fn(&Path) -> PathBuf| dir.map(f);
        let pick = |flag: &Option<PathBuf>,
                    from_profile: Option<PathBuf>,
                    from_data_dir: Option<PathBuf>,
                    name: &str|
         -> Result<PathBuf> {
            flag.clone()
                .or(from_data_dir)
                .or(from_profile)
                .ok_or_else(|| {
                    anyhow!(
                        "no {name}: pass --{name}, --data-dir of the broker, or --profile (see `sigil profile add`)"
                    )
                })
        };
        let p = profile.as_ref();
        let bundle = pick(
            &self.trust_bundle,
            p.map(|p| p.bundle.clone()),
            from_dir(&|d| d.join(BUNDLE_FILE)),
            "trust-bundle",
        )?;
        let cert = pick(
            &self.admin_cert,
            p.map(|p| p.cert.clone()),
            from_dir(&|d| d.join(ADMIN_DIR).join("admin.crt")),
            "admin-cert",
        )?;
        let key = pick(
            &self.admin_key,
            p.map(|p| p.key.clone()),
            from_dir(&|d| d.join(ADMIN_DIR).join("admin.key")),
            "admin-key",
        )?;
        let broker = match (&self.broker, dir, p) {
            (Some(b), _, _) => b.clone(),
            (None, Some(d), _) => broker_url_of(d)?,
            (None, None, Some(p)) => p.broker.clone(),
            (None, None, None) => bail!(
                "no broker: pass --broker URL, --data-dir of the broker, or --profile (see `sigil profile add`)"
            ),
        };
        // Named only if it supplied something.
        let profile = profile.filter(|p| {
            [&bundle, &cert, &key]
                .iter()
                .any(|f| **f == p.bundle || **f == p.cert || **f == p.key)
                || (self.broker.is_none() && dir.is_none())
        });
        Ok(Paths {
            broker,
            bundle,
            cert,
            key,
            profile: profile.map(|p| p.name),
        })
    }

    fn resolve(&self) -> Result<Resolved> {
        let Paths {
            broker,
            bundle,
            cert,
            key,
            profile,
        } = self.resolve_paths()?;
        let mode = std::fs::metadata(&key)
            .with_context(|| format!("operator key {}", key.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "operator key {} is readable by group or others (mode {:o}); run `chmod 600 {}`",
                key.display(),
                mode & 0o777,
                key.display()
            );
        }
        note_target(&broker, &bundle, profile.as_deref());
        Ok(Resolved {
            broker,
            bundle_pem: read(&bundle, "trust bundle")?,
            cert_pem: read(&cert, "operator certificate")?,
            key_pem: zeroize::Zeroizing::new(read(&key, "operator key")?),
        })
    }

    /// A channel to the broker with the operator credential, for services beside Admin
    /// (health).
    pub(crate) fn channel(&self) -> Result<(sigil_sdk::Failover, String)> {
        let r = self.resolve()?;
        let ch = sigil_sdk::admin_channel(&r.broker, &r.bundle_pem, &r.cert_pem, &r.key_pem)?;
        Ok((ch, r.broker))
    }
}

/// The URL a broker on `dir` listens on: `broker.url` (written by `sigil serve`), else the
/// configured listen address.
pub fn broker_url_of(dir: &Path) -> Result<String> {
    match std::fs::read_to_string(dir.join(BROKER_URL_FILE)) {
        Ok(u) => Ok(u.trim().to_owned()),
        Err(_) => {
            let cfg = sigil_broker::config::Config::load(dir)?;
            Ok(format!("https://{}", cfg.listen))
        }
    }
}
