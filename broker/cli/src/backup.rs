//! `sigil backup` and `sigil restore`: a consistent copy of the whole store while the broker
//! serves (or of a stopped one), and a new data dir made from one.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use sigil_broker::store::dump::Summary;
use sigil_proto::v1 as pb;

use crate::Conn;

/// `sigil backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Where to write the backup (created with mode 0600; an existing file is not
    /// overwritten). It holds every record of the store, private keys sealed under the master
    /// key; keep the master key apart from it.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Read a stopped broker's store directly (from --data-dir) instead of asking the running
    /// broker; works on a store a crash left behind, and writes nothing to it.
    #[arg(long)]
    pub offline: bool,
    #[command(flatten)]
    pub conn: Conn,
    /// With --offline: where the store is, when not the data dir's own.
    #[command(flatten)]
    pub store: crate::serve::StoreArgs,
}

/// `sigil restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup file (from `sigil backup`).
    pub file: PathBuf,
    /// The data dir to make: it must not exist, or hold nothing but `sigil.toml` and the
    /// master key file.
    #[arg(long, env = "SIGIL_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The master key of the store the backup came from (default: `SIGIL_MASTER_KEY`, else
    /// the data dir's configured key file, `DATA_DIR/master.key`).
    #[arg(long)]
    pub master_key_file: Option<PathBuf>,
    /// Restore into this PostgreSQL database (empty) instead of a new embedded store.
    #[command(flatten)]
    pub store: crate::serve::StoreArgs,
}

/// `sigil backup`.
pub(crate) async fn backup(a: BackupArgs) -> Result<()> {
    let tmp = temp_beside(&a.out)?;
    let written = if a.offline {
        let dir =
            a.conn.data_dir.as_deref().ok_or_else(|| {
                anyhow!("--offline needs --data-dir (a stopped broker's data dir)")
            })?;
        let mut cfg = sigil_broker::config::Config::load(dir)?;
        a.store.apply(&mut cfg)?;
        let sealer = sigil_broker::seal::Sealer::new(&sigil_broker::server::load_master_key(&cfg)?);
        let store = cfg.store()?;
        sigil_broker::store::check_master_key(&store, &sealer)?;
        let file = create_private(&tmp)?;
        let (store2, tmp2) = (store.clone(), tmp.clone());
        let r = tokio::task::spawn_blocking(move || {
            sigil_broker::store::export_offline(&store2, Box::new(std::io::BufWriter::new(file)))
        })
        .await?;
        r.map(|_| ()).map_err(|e| {
            let _ = std::fs::remove_file(&tmp2);
            anyhow!(e)
        })
    } else {
        stream_from_broker(&a.conn, &tmp).await
    };
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Complete and unaltered, before it takes its name.
    let (header, summary) = match sigil_broker::store::dump::inspect(&tmp) {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            bail!(
                "the backup did not arrive whole ({e}); nothing was written to {}",
                a.out.display()
            );
        }
    };
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    if a.out.exists() {
        let _ = std::fs::remove_file(&tmp);
        bail!("{} exists; not overwritten", a.out.display());
    }
    std::fs::rename(&tmp, &a.out).with_context(|| format!("naming {}", a.out.display()))?;
    sync_parent(&a.out)?;
    println!(
        "backup written to {} (trust domain {}): {}",
        a.out.display(),
        header.meta.trust_domain,
        describe(&summary)
    );
    println!(
        "restore with: sigil restore {} --data-dir NEW_DIR (needs this store's master key)",
        a.out.display()
    );
    Ok(())
}

async fn stream_from_broker(conn: &Conn, tmp: &Path) -> Result<()> {
    let mut c = conn.connect()?;
    let mut stream = c
        .backup(pb::BackupRequest {})
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    let mut out = std::io::BufWriter::new(create_private(tmp)?);
    while let Some(chunk) = stream.message().await.map_err(sigil_sdk::SdkError::from)? {
        out.write_all(&chunk.data)
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    out.flush()
        .with_context(|| format!("writing {}", tmp.display()))?;
    Ok(())
}

/// `sigil restore`.
pub(crate) async fn restore(a: RestoreArgs) -> Result<()> {
    let dir = &a.data_dir;
    check_restore_target(dir)?;
    let mut cfg = sigil_broker::config::Config::load(dir)?;
    a.store.apply(&mut cfg)?;
    if let Some(k) = &a.master_key_file {
        cfg.master_key_file = Some(k.clone());
    }
    let key = sigil_broker::server::load_master_key(&cfg).with_context(|| {
        "the master key of the store the backup came from is needed (SIGIL_MASTER_KEY, --master-key-file, or DATA_DIR/master.key)"
    })?;
    let sealer = std::sync::Arc::new(sigil_broker::seal::Sealer::new(&key));
    let made_dir = !dir.exists();
    sigil_broker::fsutil::create_private_dir(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let store = cfg.store()?;
    let (s2, k2, f2) = (store.clone(), sealer.clone(), a.file.clone());
    let restored =
        tokio::task::spawn_blocking(move || sigil_broker::store::restore(&s2, &k2, &f2)).await?;
    let summary = match restored {
        Ok(s) => s,
        Err(e) => {
            // Nothing was written: leave no directory behind either.
            if made_dir {
                let _ = std::fs::remove_dir(dir);
            }
            return Err(e.into());
        }
    };
    // The restored store opens as a broker would open it, and its bundle is written beside
    // it for operators and workloads.
    let opened = sigil_broker::store::open(&store, sealer.clone(), Default::default()).await?;
    let meta = opened.meta().await?;
    let keys = opened.keys().await?;
    let report = sigil_broker::audit::verify_store(&*opened, &sealer).await;
    opened.close().await;
    let ring = sigil_broker::keys::load(&meta.trust_domain, &keys, &sealer)?;
    let bundle = dir.join(sigil_broker::config::BUNDLE_FILE);
    sigil_broker::fsutil::write_atomic(&bundle, ring.bundle.x509_pem().as_bytes(), 0o644)
        .with_context(|| format!("writing {}", bundle.display()))?;
    match report? {
        sigil_broker::audit::ChainReport::Intact { entries } => {
            println!(
                "restored into {} (trust domain {}): {}; audit log intact to entry {entries}",
                dir.display(),
                meta.trust_domain,
                describe(&summary)
            );
        }
        sigil_broker::audit::ChainReport::Broken { seq, reason } => {
            bail!("restored, but its audit log is broken at entry {seq}: {reason}")
        }
    }
    if !dir.join(sigil_broker::config::CONFIG_FILE).exists() {
        println!(
            "note: {} has no sigil.toml; `sigil serve` will use the defaults (listen 127.0.0.1:8443). Copy the old broker's sigil.toml there",
            dir.display()
        );
    }
    match &a.master_key_file {
        // The key stays where it was: serve needs to be told, as restore was.
        Some(k) if !dir.join(sigil_broker::config::MASTER_KEY_FILE).exists() => println!(
            "start it with: sigil serve --data-dir {} --master-key-file {}",
            dir.display(),
            k.display()
        ),
        _ => println!("start it with: sigil serve --data-dir {}", dir.display()),
    }
    Ok(())
}

/// A restore makes a new data dir: refuse one that holds anything but its configuration and
/// master key (which an operator may have put there first, from a ConfigMap and a Secret).
fn check_restore_target(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow!(e).context(format!("reading {}", dir.display()))),
    };
    let allowed = [
        sigil_broker::config::CONFIG_FILE,
        sigil_broker::config::MASTER_KEY_FILE,
    ];
    let others: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !allowed.contains(&n.as_str()))
        .collect();
    if !others.is_empty() {
        bail!(
            "{} is not empty (it holds {}); restore makes a new data dir and never overwrites one. Pick a new directory",
            dir.display(),
            others.join(", ")
        );
    }
    Ok(())
}

fn describe(s: &Summary) -> String {
    format!(
        "{} identities, {} keys, {} ledger records, {} revocations, {} join tokens, {} audit entries (to entry {})",
        s.identities, s.keys, s.ledger, s.revocations, s.join_tokens, s.audit, s.audit_head
    )
}

/// A temporary name beside `out`, so the final rename stays on one filesystem.
fn temp_beside(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| anyhow!("--out {} names no file", out.display()))?;
    let mut tmp = name.to_owned();
    tmp.push(format!(".partial-{}", std::process::id()));
    Ok(out.with_file_name(tmp))
}

fn create_private(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}
