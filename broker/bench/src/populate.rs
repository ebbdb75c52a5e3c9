//! `sigil bench --populate N`: fills a stopped broker's store with N ledger rows (credentials
//! issued over the past month, long expired, as a busy broker accumulates them) and live
//! revocations, through the same store and writer the broker uses, so the scale figures are
//! measured on a realistically large file.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use sigil_pki::ids;

use sigil_broker::model::{CredentialKind, LedgerRecord, RevocationRecord};
use sigil_broker::seal::{MasterKey, Sealer};
use sigil_broker::store::{Change, Op};

use super::driver::Figures;

/// What was written.
#[derive(Debug, Clone, Copy)]
pub(super) struct Populated {
    pub(super) rows: u64,
    pub(super) revocations: u64,
    pub(super) took: Duration,
}

/// The populated store: what was written, its size, time to ready, its figures, and the
/// figures of an empty store measured alternately with it.
pub(super) type Scale = (
    Populated,
    u64,
    Duration,
    Vec<(String, Figures)>,
    Vec<(String, Figures)>,
);

/// Rounds of [`alternate`](crate::alternate): populated then empty, then empty then populated
/// (ABBA), so a machine that speeds up or slows down during the run favours neither.
pub(super) const ALTERNATE_ROUNDS: usize = 2;

/// Writes `rows` ledger records and `revocations` live revocations of identity
/// (`identity_id`, `spiffe_id`) into the store in `data`.
pub(super) async fn populate(
    data: &Path,
    master: &MasterKey,
    identity_id: &str,
    spiffe_id: &str,
    rows: u64,
    revocations: u64,
    progress: &indicatif::ProgressBar,
) -> Result<Populated> {
    let started = Instant::now();
    let sealer = Arc::new(Sealer::new(master));
    let store = sigil_broker::store::open(
        &sigil_broker::store::StoreConfig::in_data_dir(data),
        sealer,
        Default::default(),
    )
    .await?;
    let now = SystemTime::now();
    let now_s = sigil_broker::clock::unix_secs(now);
    const BATCH: u64 = 20_000;
    progress.set_length(rows + revocations);
    let mut written = 0u64;
    while written < rows {
        let n = BATCH.min(rows - written);
        let mut ops = Vec::with_capacity(n as usize);
        for k in 0..n {
            let i = written + k;
            // Spread over the last 30 days, oldest first, an hour each: long expired.
            let age = Duration::from_secs_f64(
                (2.0 + 28.0 * (rows - i) as f64 / rows.max(1) as f64) * 86400.0,
            );
            let issued = now - age;
            let (kind, id) = if i.is_multiple_of(2) {
                (CredentialKind::X509, ids::to_hex(&ids::new_serial(issued)))
            } else {
                (
                    CredentialKind::Jwt,
                    ids::jti_to_string(&ids::new_jti(issued)),
                )
            };
            let issued_at = sigil_broker::clock::unix_secs(issued);
            ops.push(Op::AppendLedger(LedgerRecord {
                credential_id: id,
                kind,
                identity_id: identity_id.to_owned(),
                spiffe_id: spiffe_id.to_owned(),
                generation: 1,
                audiences: if kind == CredentialKind::Jwt {
                    vec!["bench".into()]
                } else {
                    Vec::new()
                },
                scopes: Vec::new(),
                dns_names: Vec::new(),
                issued_at,
                expires_at: issued_at + 3600,
                signing_key_id: "populated".into(),
                attestation: "populate".into(),
                source: "127.0.0.1".into(),
            }));
        }
        store
            .commit(Change {
                ops,
                audit: Vec::new(),
            })
            .await?;
        written += n;
        progress.set_position(written);
    }
    let mut revoked = 0u64;
    while revoked < revocations {
        let n = BATCH.min(revocations - revoked);
        let ops = (0..n)
            .map(|k| {
                let id = ids::jti_to_string(&ids::new_jti(now));
                Op::PutRevocation(RevocationRecord {
                    credential_id: id,
                    kind: CredentialKind::Jwt,
                    identity_id: identity_id.to_owned(),
                    spiffe_id: spiffe_id.to_owned(),
                    signing_key_id: "populated".into(),
                    // Live for hours to days: none is pruned during the run.
                    expires_at: now_s + 3600 + ((revoked + k) % 86400) as i64 * 6,
                    revoked_at: now_s,
                    reason: "populated by sigil bench".into(),
                    revoked_by: "sigil bench".into(),
                })
            })
            .collect();
        store
            .commit(Change {
                ops,
                audit: Vec::new(),
            })
            .await?;
        revoked += n;
        progress.set_position(rows + revoked);
    }
    store.close().await;
    Ok(Populated {
        rows,
        revocations,
        took: started.elapsed(),
    })
}
