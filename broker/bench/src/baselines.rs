//! What the broker's figures are read against, measured in the same run on the same machine: the
//! raw costs of one durable store commit, one ES256 signature and one CSR check plus leaf
//! signature ([`Baseline`]), and a plain gRPC round trip over the bench's own TLS connections.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, anyhow};

use crate::args::BenchArgs;
use crate::driver::{Figures, code, drive};
use crate::scenarios::{Fixture, csr_pool};

/// Raw costs on this machine, one core each.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// Durable single-row store commits per second (one fsync each).
    pub store_commit_per_s: f64,
    /// ES256 signatures per second.
    pub es256_sign_per_s: f64,
    /// CSR signature checks + leaf signatures per second.
    pub csr_issue_per_s: f64,
}

fn rate(n: u32, f: impl FnMut(u32) -> Result<()>) -> Result<f64> {
    let mut f = f;
    let t = Instant::now();
    for i in 0..n {
        f(i)?;
    }
    Ok(f64::from(n) / t.elapsed().as_secs_f64())
}

/// Measures [`Baseline`].
pub fn baseline() -> Result<Baseline> {
    let dir = tempfile::tempdir()?;
    let store_commit_per_s = sigil_broker::store::durable_commit_rate(dir.path(), 300)?;
    let key = sigil_pki::EcKey::generate()?;
    let es256_sign_per_s = rate(3000, |_| {
        key.sign_es256(b"header.payload")?;
        Ok(())
    })?;
    let td: sigil_pki::TrustDomain = "bench.sigil.test".parse().map_err(|e| anyhow!("{e}"))?;
    let now = SystemTime::now();
    let root = sigil_pki::CertificateAuthority::new_self_signed(
        sigil_pki::CaRole::Root,
        &td,
        sigil_pki::EcKey::generate()?,
        now,
        Duration::from_secs(86400),
    )?;
    let int = root.new_intermediate(
        &td,
        sigil_pki::EcKey::generate()?,
        now,
        Duration::from_secs(86400),
    )?;
    let csrs = csr_pool(64)?;
    let id = td.id_with_path("/bench").map_err(|e| anyhow!("{e}"))?;
    let csr_issue_per_s = rate(1500, |i| {
        let csr = sigil_pki::VerifiedCsr::from_der(&csrs[i as usize % csrs.len()])?;
        int.mint_leaf(
            &csr,
            &sigil_pki::LeafSpec {
                spiffe_id: &id,
                dns_names: &[],
                ip_addresses: &[],
                usage: sigil_pki::LeafUsage::ServerAndClient,
                now,
                ttl: Duration::from_secs(600),
                backdate: Duration::from_secs(30),
                serial: &sigil_pki::ids::new_serial(now),
            },
        )?;
        Ok(())
    })?;
    Ok(Baseline {
        store_commit_per_s,
        es256_sign_per_s,
        csr_issue_per_s,
    })
}

/// A plain gRPC unary round trip over the same TLS connections: `grpc.health.v1/Check`,
/// which does no work, so this is the transport's ceiling in this run.
pub(crate) async fn tls_echo(fx: &Fixture, a: &BenchArgs, pid: Option<u32>) -> Figures {
    let channels = fx.channels.clone();
    let times = (a.warmup, a.duration.min(Duration::from_secs(5)));
    drive("tls echo", a, pid, times, move |i, _| {
        let ch = channels[i % channels.len()].clone();
        async move {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            h.check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
            .map_err(code)
        }
    })
    .await
}
