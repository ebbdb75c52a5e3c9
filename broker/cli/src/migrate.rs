//! `sigil migrate`: bring a PostgreSQL store's schema up to this build's, or move an embedded
//! store into PostgreSQL to run several replicas.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;

/// `sigil migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// A stopped broker's data dir: its embedded store (identities, keys, ledger,
    /// revocations, the audit chain with its hashes) is copied into --to, which must hold no
    /// store yet. Without it, only --to's schema is brought up to date.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// The PostgreSQL database (postgres://user:password@host:5432/sigil).
    #[arg(long, env = "SIGIL_STORE", hide_env_values = true)]
    pub to: String,
    /// CA certificates (PEM) to verify the PostgreSQL server with.
    #[arg(long, env = "SIGIL_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
}

/// `sigil migrate`.
pub(crate) async fn run(a: MigrateArgs) -> Result<()> {
    let target = sigil_broker::store::StoreConfig::postgres(&a.to, a.store_ca_file.clone())?;
    let Some(from) = a.from else {
        match sigil_broker::store::migrate_schema(&target).await? {
            Some((found, now)) if found == now => {
                println!("{}: schema version {now}, nothing to do", target.describe())
            }
            Some((found, now)) => println!(
                "{}: schema migrated from version {found} to {now}",
                target.describe()
            ),
            None => {}
        }
        return Ok(());
    };
    let cfg = sigil_broker::config::Config::load(&from)?;
    let source = cfg.store()?;
    if source.shared() {
        bail!(
            "{} is configured with a database store already ({}); --from takes a data dir with an embedded store",
            from.display(),
            source.describe()
        );
    }
    let key = sigil_broker::server::load_master_key(&cfg).context(
        "the master key of the store being moved (SIGIL_MASTER_KEY or the data dir's key file)",
    )?;
    let sealer = std::sync::Arc::new(sigil_broker::seal::Sealer::new(&key));
    sigil_broker::store::check_master_key(&source, &sealer)?;
    // Through a backup file: the same checks as `sigil restore` (complete, this key, the
    // chain intact to its anchor) before anything is written to the database.
    let tmp = tempfile::Builder::new()
        .prefix("sigil-migrate-")
        .tempdir()
        .context("temp dir")?;
    let file = tmp.path().join("store.backup");
    let (src, f) = (source.clone(), file.clone());
    let exported = tokio::task::spawn_blocking(move || {
        let out = std::fs::File::create(&f)?;
        Ok::<_, anyhow::Error>(sigil_broker::store::export_offline(
            &src,
            Box::new(std::io::BufWriter::new(out)),
        )?)
    })
    .await??;
    let (t, k, f) = (target.clone(), sealer.clone(), file.clone());
    let summary =
        tokio::task::spawn_blocking(move || sigil_broker::store::restore(&t, &k, &f)).await??;
    let t = target.clone();
    let chain =
        tokio::task::spawn_blocking(move || sigil_broker::store::read_audit_offline(&t)).await??;
    match sigil_broker::audit::verify_stored(&sealer, &chain) {
        sigil_broker::audit::ChainReport::Intact { entries } => println!(
            "moved {} into {}: {} identities, {} keys, {} ledger records, {} revocations; audit log intact to entry {entries}",
            source.describe(),
            target.describe(),
            summary.identities,
            summary.keys,
            summary.ledger,
            summary.revocations
        ),
        sigil_broker::audit::ChainReport::Broken { seq, reason } => {
            bail!("moved, but the audit log in the database is broken at entry {seq}: {reason}")
        }
    }
    debug_assert_eq!(exported.ledger, summary.ledger);
    println!(
        "start every replica with: SIGIL_STORE=<the URL> sigil serve --data-dir {} (the same master key on each)",
        from.display()
    );
    Ok(())
}
