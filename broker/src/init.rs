//! `sigil init`: a new data dir with a master key (0600), sealed root, intermediate, operator
//! CA and JWT keys, the first operator credential (0600), the config, and `bundle.pem` — the
//! trust bundle to hand to workloads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sigil_pki::{EcKey, LeafSpec, LeafUsage, TrustDomain, certs_to_pem, ids};

use crate::audit::{AuditDraft, Decision};
use crate::clock::{Clock, unix_nanos, unix_secs};
use crate::config::{ADMIN_DIR, BUNDLE_FILE, CONFIG_FILE, Config, MASTER_KEY_FILE};
use crate::fsutil::{create_private_dir, write_atomic};
use crate::keys;
use crate::model::{CredentialKind, LedgerRecord};
use crate::seal::{MasterKey, Sealer};
use crate::store::{Change, Op, SCHEMA_VERSION, StoreMeta};

/// What to create.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The new data dir (must not exist, or be empty).
    pub data_dir: PathBuf,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// gRPC listen address to write into the config.
    pub listen: Option<SocketAddr>,
    /// HTTP listen address to write into the config (`Some(None)` turns HTTP off).
    pub http_listen: Option<Option<SocketAddr>>,
    /// Name of the first operator.
    pub operator: String,
    /// Lifetime of the first operator credential.
    pub operator_ttl: Duration,
    /// Use this master key instead of generating one (from `SIGIL_MASTER_KEY`); it is then
    /// not written to disk.
    pub master_key: Option<MasterKey>,
    /// A PostgreSQL URL for the store instead of the embedded one (the schema is created
    /// there; a database that already holds a store is refused).
    pub store: Option<String>,
    /// CA certificates to verify the PostgreSQL server with.
    pub store_ca_file: Option<PathBuf>,
    /// DNS names for the broker's certificate besides `localhost`: the names workloads and
    /// operators dial it by.
    pub server_names: Vec<String>,
}

/// What was created.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The data dir.
    pub data_dir: PathBuf,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The trust bundle for workloads.
    pub bundle: PathBuf,
    /// The operator certificate.
    pub admin_cert: PathBuf,
    /// The operator key (0600).
    pub admin_key: PathBuf,
    /// The master key file, when one was written.
    pub master_key_file: Option<PathBuf>,
    /// The config file.
    pub config_file: PathBuf,
}

/// Why init failed. Nothing is left behind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// The data dir is in use.
    #[error("refusing to overwrite {0}: it already exists and is not empty")]
    Exists(String),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// Anything else.
    #[error("init failed: {0}")]
    Failed(String),
}

fn failed(e: impl std::fmt::Display) -> InitError {
    InitError::Failed(e.to_string())
}

fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

/// Creates a data dir. On failure everything it wrote is removed again.
pub async fn init(opts: InitOptions, clock: &dyn Clock) -> Result<InitReport, InitError> {
    let dir = opts.data_dir.clone();
    let existed = dir.exists();
    if existed && !dir_is_empty(&dir) {
        return Err(InitError::Exists(dir.display().to_string()));
    }
    if opts.operator.is_empty()
        || !opts
            .operator
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
    {
        return Err(InitError::Invalid(format!(
            "operator name {:?} must be lower-case letters, digits, '.', '_' or '-'",
            opts.operator
        )));
    }
    create_private_dir(&dir).map_err(failed)?;
    let result = init_inner(&opts, clock).await;
    if result.is_err() {
        // Leave nothing half-made behind.
        if existed {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    result
}

async fn init_inner(opts: &InitOptions, clock: &dyn Clock) -> Result<InitReport, InitError> {
    let dir = &opts.data_dir;
    let now = clock.now();
    let td = &opts.trust_domain;

    let (master, master_key_file) = match &opts.master_key {
        Some(k) => (k.clone(), None),
        None => {
            let k = MasterKey::generate();
            let p = dir.join(MASTER_KEY_FILE);
            k.write_new_file(&p).map_err(failed)?;
            (k, Some(p))
        }
    };
    let sealer = std::sync::Arc::new(Sealer::new(&master));

    let mut cfg = Config {
        data_dir: dir.clone(),
        trust_domain: Some(td.to_string()),
        ..Config::default()
    };
    if let Some(l) = opts.listen {
        cfg.listen = l;
    }
    if let Some(h) = opts.http_listen {
        cfg.http_listen = h;
    }
    for n in &opts.server_names {
        if !cfg.server_names.contains(n) {
            cfg.server_names.push(n.clone());
        }
    }
    cfg.validate()
        .map_err(|e| InitError::Invalid(e.to_string()))?;
    // A URL with a password stays out of the config file: replicas get it from SIGIL_STORE.
    let mut store_cfg = cfg.clone();
    if let Some(url) = &opts.store {
        store_cfg.store = Some(crate::config::StoreUrl(url.clone()));
        store_cfg.store_ca_file = opts.store_ca_file.clone();
        store_cfg
            .validate()
            .map_err(|e| InitError::Invalid(e.to_string()))?;
        cfg.store_ca_file = opts.store_ca_file.clone();
        let pg = crate::store::PgConfig::new(url, None).map_err(failed)?;
        if !pg.has_password() {
            cfg.store = store_cfg.store.clone();
        }
    }
    let config_file = dir.join(CONFIG_FILE);
    let header = "# Sigil broker settings. Durations: 90s, 10m, 1h, 90d. See deploy/sigil.toml for every option.\n";
    write_atomic(
        &config_file,
        format!("{header}{}", cfg.to_toml()).as_bytes(),
        0o640,
    )
    .map_err(failed)?;

    let key_records = keys::generate(td, now, &sealer, cfg.rotation.x509_ca_ttl).map_err(failed)?;
    let ring = keys::load(td, &key_records, &sealer).map_err(failed)?;
    let meta = StoreMeta {
        schema_version: SCHEMA_VERSION,
        trust_domain: td.clone(),
        created_at: unix_secs(now),
    };
    let store = crate::store::create(&store_cfg.store().map_err(failed)?, sealer.clone(), meta)
        .await
        .map_err(failed)?;

    // The first operator credential, from the operator CA.
    let op_key = EcKey::generate().map_err(failed)?;
    let op_id = td
        .id_with_path(&format!("/sigil/operator/{}", opts.operator))
        .map_err(failed)?;
    let serial = ids::new_serial(now);
    let leaf = ring
        .operator_ca
        .mint_leaf(
            &op_key,
            &LeafSpec {
                spiffe_id: &op_id,
                dns_names: &[],
                ip_addresses: &[],
                usage: LeafUsage::ClientOnly,
                now,
                ttl: opts.operator_ttl,
                backdate: sigil_pki::ca::MAX_BACKDATE,
                serial: &serial,
            },
        )
        .map_err(failed)?;

    let mut change = Change::default();
    let t = unix_nanos(now);
    change.audit.push(
        AuditDraft::new(
            t,
            "sigil-init",
            "broker.init",
            td.as_str(),
            Decision::Allow,
            "data dir created",
            "init",
        )
        .with("root_ca", ring.root.subject())
        .with(
            "keys",
            serde_json::json!(key_records.iter().map(|k| k.id.clone()).collect::<Vec<_>>()),
        ),
    );
    for k in key_records {
        change.ops.push(Op::PutKey(k));
    }
    let serial_hex = ids::to_hex(&serial);
    change.ops.push(Op::AppendLedger(LedgerRecord {
        credential_id: serial_hex.clone(),
        kind: CredentialKind::X509,
        identity_id: String::new(),
        spiffe_id: op_id.to_string(),
        generation: 0,
        audiences: Vec::new(),
        scopes: Vec::new(),
        dns_names: Vec::new(),
        issued_at: unix_secs(now),
        expires_at: unix_secs(leaf.not_after),
        signing_key_id: ring.operator_ca.key().kid().to_owned(),
        attestation: "init".into(),
        source: String::new(),
    }));
    change.audit.push(
        AuditDraft::new(
            t,
            "sigil-init",
            "operator.credential.issue",
            op_id.as_str(),
            Decision::Allow,
            "first operator credential",
            "init",
        )
        .with("serial", serial_hex)
        .with("expires_at", unix_secs(leaf.not_after)),
    );
    let committed = store.commit(change).await;
    store.close().await;
    committed.map_err(failed)?;

    let admin_dir = dir.join(ADMIN_DIR);
    create_private_dir(&admin_dir).map_err(failed)?;
    let admin_cert = admin_dir.join("admin.crt");
    let admin_key = admin_dir.join("admin.key");
    write_atomic(&admin_cert, certs_to_pem([&leaf.der]).as_bytes(), 0o644).map_err(failed)?;
    write_atomic(
        &admin_key,
        op_key.to_pkcs8_pem().map_err(failed)?.expose_secret(),
        0o600,
    )
    .map_err(failed)?;
    let bundle = dir.join(BUNDLE_FILE);
    write_atomic(&bundle, ring.bundle.x509_pem().as_bytes(), 0o644).map_err(failed)?;

    Ok(InitReport {
        data_dir: dir.clone(),
        trust_domain: td.clone(),
        bundle,
        admin_cert,
        admin_key,
        master_key_file,
        config_file,
    })
}
