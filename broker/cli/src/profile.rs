//! `sigil profile`: named connections for remote operators (broker URL, trust bundle and an
//! operator credential), kept under the user's config dir and picked with `--profile` or
//! `SIGIL_PROFILE` — what `step ca bootstrap` and a `VAULT_ADDR` plus token helper give.
//!
//! Layout: `$SIGIL_CONFIG_DIR` (else `$XDG_CONFIG_HOME/sigil`, else `~/.config/sigil`) holds
//! `profiles.toml` (`current` and one `[profile.NAME]` table each, with `broker`) and
//! `profiles/NAME/` (0700) with copies of `bundle.pem`, `operator.crt` and `operator.key`
//! (0600), so a profile keeps working when the files it was made from move.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sigil_proto::v1 as pb;

use crate::conn::Conn;

/// `sigil profile ...`.
#[derive(Debug, Subcommand)]
pub enum ProfileCmd {
    /// Save how to reach a broker under NAME: from --data-dir of a local broker, or from
    /// --broker, --trust-bundle, --admin-cert and --admin-key. Checks the credential works
    /// (as `sigil whoami`) before saving. The first profile becomes the current one.
    Add {
        /// The profile's name (letters, digits, `.`, `_`, `-`).
        name: String,
        /// Make it the current profile.
        #[arg(long = "use")]
        make_current: bool,
        /// Replace a profile of the same name.
        #[arg(long)]
        force: bool,
        /// Save without checking that the broker accepts the credential.
        #[arg(long)]
        no_verify: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the profiles (the current one marked).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make NAME the profile commands use when given neither --profile nor --data-dir.
    Use {
        /// The profile.
        name: String,
    },
    /// Delete a profile and its copies of the credential.
    Remove {
        /// The profile.
        name: String,
    },
}

/// One saved profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Entry {
    /// Broker URL (several, comma-separated, for replicas).
    pub broker: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfilesFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    current: Option<String>,
    #[serde(default)]
    profile: BTreeMap<String, Entry>,
}

/// A profile resolved to its files.
#[derive(Debug, Clone)]
pub(crate) struct Profile {
    pub name: String,
    pub broker: String,
    pub bundle: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where profiles live.
pub(crate) fn config_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("SIGIL_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("sigil"));
    }
    let home = std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .ok_or_else(|| anyhow!("no config dir: set SIGIL_CONFIG_DIR (or HOME)"))?;
    Ok(PathBuf::from(home).join(".config").join("sigil"))
}

fn profiles_path(dir: &Path) -> PathBuf {
    dir.join("profiles.toml")
}

fn load(dir: &Path) -> Result<ProfilesFile> {
    let path = profiles_path(dir);
    match std::fs::read_to_string(&path) {
        Ok(s) => toml::from_str(&s).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ProfilesFile::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save(dir: &Path, f: &ProfilesFile) -> Result<()> {
    create_private_dir(dir)?;
    write_atomic(&profiles_path(dir), toml::to_string(f)?.as_bytes(), 0o600)
}

fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    sigil_broker::fsutil::write_atomic(path, bytes, mode)
        .with_context(|| format!("writing {}", path.display()))
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        bail!(
            "profile name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        );
    }
    Ok(())
}

fn resolved(dir: &Path, name: &str, e: &Entry) -> Profile {
    let files = dir.join("profiles").join(name);
    Profile {
        name: name.to_owned(),
        broker: e.broker.clone(),
        bundle: files.join("bundle.pem"),
        cert: files.join("operator.crt"),
        key: files.join("operator.key"),
    }
}

/// The profile named `name`, or (with `None`) the current one if there is one.
pub(crate) fn find(name: Option<&str>) -> Result<Option<Profile>> {
    let dir = match (config_dir(), name) {
        (Ok(d), _) => d,
        (Err(_), None) => return Ok(None),
        (Err(e), Some(_)) => return Err(e),
    };
    let f = load(&dir)?;
    match name {
        Some(n) => {
            let e = f.profile.get(n).ok_or_else(|| {
                anyhow!(
                    "no profile {n:?} in {} (see `sigil profile list`)",
                    profiles_path(&dir).display()
                )
            })?;
            Ok(Some(resolved(&dir, n, e)))
        }
        None => Ok(f
            .current
            .as_deref()
            .and_then(|n| f.profile.get(n).map(|e| resolved(&dir, n, e)))),
    }
}

/// `sigil profile ...`.
pub(crate) async fn run(cmd: ProfileCmd) -> Result<()> {
    let dir = config_dir()?;
    match cmd {
        ProfileCmd::Add {
            name,
            make_current,
            force,
            no_verify,
            conn,
        } => {
            check_name(&name)?;
            let mut f = load(&dir)?;
            if f.profile.contains_key(&name) && !force {
                bail!("profile {name:?} exists: pass --force to replace it");
            }
            let src = conn.resolve_paths()?;
            let who = if no_verify {
                None
            } else {
                let r = conn
                    .connect()?
                    .who_am_i(pb::WhoAmIRequest {})
                    .await
                    .map_err(sigil_sdk::SdkError::from)?
                    .into_inner();
                Some(r)
            };
            let files = dir.join("profiles").join(&name);
            create_private_dir(&dir)?;
            create_private_dir(&dir.join("profiles"))?;
            create_private_dir(&files)?;
            let copy = |from: &Path, to: &str, mode: u32| -> Result<()> {
                let bytes =
                    std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
                let bytes = zeroize::Zeroizing::new(bytes);
                write_atomic(&files.join(to), &bytes, mode)
            };
            copy(&src.bundle, "bundle.pem", 0o644)?;
            copy(&src.cert, "operator.crt", 0o644)?;
            copy(&src.key, "operator.key", 0o600)?;
            f.profile.insert(
                name.clone(),
                Entry {
                    broker: src.broker.clone(),
                },
            );
            let current = make_current || f.current.is_none();
            if current {
                f.current = Some(name.clone());
            }
            save(&dir, &f)?;
            let who = who
                .map(|w| format!(" as operator {:?} (role {})", w.name, w.role))
                .unwrap_or_default();
            println!(
                "profile {name:?} saved: {}{who}{}",
                src.broker,
                if current {
                    "; it is the current profile"
                } else {
                    ""
                }
            );
        }
        ProfileCmd::List { json } => {
            let f = load(&dir)?;
            if json {
                let v: Vec<_> = f
                    .profile
                    .iter()
                    .map(|(n, e)| {
                        json!({"name": n, "broker": e.broker, "current": f.current.as_deref() == Some(n.as_str())})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&json!({"profiles": v}))?);
                return Ok(());
            }
            if f.profile.is_empty() {
                println!("no profiles (add one with `sigil profile add NAME --data-dir DIR`)");
                return Ok(());
            }
            println!("{:<2}{:<20} BROKER", "", "NAME");
            for (n, e) in &f.profile {
                let mark = if f.current.as_deref() == Some(n.as_str()) {
                    "*"
                } else {
                    ""
                };
                println!("{mark:<2}{n:<20} {}", e.broker);
            }
        }
        ProfileCmd::Use { name } => {
            let mut f = load(&dir)?;
            if !f.profile.contains_key(&name) {
                bail!("no profile {name:?} (see `sigil profile list`)");
            }
            f.current = Some(name.clone());
            save(&dir, &f)?;
            println!("current profile: {name}");
        }
        ProfileCmd::Remove { name } => {
            let mut f = load(&dir)?;
            if f.profile.remove(&name).is_none() {
                bail!("no profile {name:?} (see `sigil profile list`)");
            }
            if f.current.as_deref() == Some(name.as_str()) {
                f.current = None;
            }
            save(&dir, &f)?;
            check_name(&name)?;
            let files = dir.join("profiles").join(&name);
            if files.exists() {
                std::fs::remove_dir_all(&files)
                    .with_context(|| format!("removing {}", files.display()))?;
            }
            println!("profile {name:?} removed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_cannot_leave_the_profiles_dir() {
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(super::check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["prod", "eu-west.1", "ci_ro"] {
            super::check_name(good).unwrap();
        }
    }
}
