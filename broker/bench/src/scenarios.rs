//! What the load is made of: the bench identity and its attested workload connections, a pool
//! of CSRs, join tokens made up front; the bodies of the jwt, x509, mixed, renew and attest
//! scenarios (run by the driver), and the revoke scenario (watch streams receiving revocations)
//! with the revoke call's own latency.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sigil_proto::v1 as pb;
use sigil_proto::v1::broker_client::BrokerClient;
use sigil_sdk::transport::{self, BrokerTarget, ClientCertSlot};
use sigil_sdk::{ClientConfig, Evidence, SvidOptions, WorkloadClient};
use tonic::transport::Channel;

use crate::args::{BenchArgs, Scenario};
use crate::driver::{Figures, OpError, code, drive, histogram, quantiles, sdk_code};
use crate::target::{Target, rss_mb};

/// The bench identity: x509 + jwt, audience `bench`.
pub(crate) async fn bench_identity(t: &Target) -> Result<String> {
    let probe = WorkloadClient::new(ClientConfig::new(t.url.clone(), t.bundle_pem.clone()))?;
    let td = probe.fetch_bundle().await?.bundle.trust_domain.clone();
    let mut admin = t.conn.connect()?;
    let spiffe_id = format!(
        "spiffe://{td}/bench/{}",
        sigil_pki::ids::to_hex(&sigil_pki::ids::random_bytes::<4>())
    );
    admin
        .create_identity(pb::CreateIdentityRequest {
            spiffe_id: spiffe_id.clone(),
            owner: "sigil bench".into(),
            purpose: "load generation".into(),
            labels: Default::default(),
            selectors: Vec::new(),
            entitlements: Some(pb::Entitlements {
                kinds: vec!["x509".into(), "jwt".into()],
                max_ttl_seconds: 3600,
                audiences: vec!["bench".into()],
                scopes: Vec::new(),
                dns_names: Vec::new(),
                ..Default::default()
            }),
            expires_in_seconds: 86400,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?;
    Ok(spiffe_id)
}

/// Attests `n` workloads of the bench identity and returns an mTLS client for each.
async fn workloads(t: &Target, spiffe_id: &str, n: usize) -> Result<Vec<BrokerClient<Channel>>> {
    Ok(workload_channels(t, spiffe_id, n)
        .await?
        .into_iter()
        .map(BrokerClient::new)
        .collect())
}

/// A workload client of `spiffe_id`, attested with a join token made for it.
async fn attested_workload(
    t: &Target,
    admin: &mut pb::admin_client::AdminClient<sigil_sdk::Failover>,
    spiffe_id: &str,
) -> Result<(WorkloadClient, sigil_sdk::Credentials)> {
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            id_or_spiffe_id: spiffe_id.to_owned(),
            ttl_seconds: 600,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner()
        .token;
    let w = WorkloadClient::new(ClientConfig::new(t.url.clone(), t.bundle_pem.clone()))?;
    let creds = w
        .attest(
            Evidence::JoinToken(token.into()),
            SvidOptions::default(),
            &[],
        )
        .await?;
    Ok((w, creds))
}

/// Attests `n` workloads of the bench identity and returns an mTLS channel for each.
async fn workload_channels(t: &Target, spiffe_id: &str, n: usize) -> Result<Vec<Channel>> {
    let mut admin = t.conn.connect()?;
    let target = BrokerTarget::parse(&t.url)?;
    let roots = transport::roots_from_pem(&t.bundle_pem)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (_, creds) = attested_workload(t, &mut admin, spiffe_id).await?;
        let slot = Arc::new(ClientCertSlot::default());
        slot.set(
            creds.svid.cert_chain.clone(),
            creds.svid.private_key_der().expose_secret(),
        )?;
        let tls = transport::client_config(roots.clone(), Some(slot))?;
        out.push(transport::channel(&target, tls, Duration::from_secs(30))?);
    }
    Ok(out)
}

/// `n` CSRs, each for a fresh key.
pub(crate) fn csr_pool(n: usize) -> Result<Vec<Vec<u8>>> {
    (0..n)
        .map(|_| Ok(sigil_pki::csr::request_for(&sigil_pki::EcKey::generate()?)?))
        .collect()
}

/// What the issuance scenarios run against.
pub(crate) struct Fixture {
    pub(crate) channels: Arc<Vec<Channel>>,
    clients: Arc<Vec<BrokerClient<Channel>>>,
    anon: Arc<Vec<BrokerClient<Channel>>>,
    sdk: Arc<Vec<WorkloadClient>>,
    pub(crate) csrs: Arc<Vec<Vec<u8>>>,
}

/// Connects the workloads (mTLS and anonymous, and SDK clients for renew) and makes the CSRs
/// the issuance scenarios use.
pub(crate) async fn fixture(t: &Target, spiffe_id: &str, a: &BenchArgs) -> Result<Fixture> {
    let n = a.connections.max(1);
    let channels = workload_channels(t, spiffe_id, n).await?;
    let clients = channels.iter().cloned().map(BrokerClient::new).collect();
    let target = BrokerTarget::parse(&t.url)?;
    let roots = transport::roots_from_pem(&t.bundle_pem)?;
    let anon = (0..n)
        .map(|_| {
            Ok(BrokerClient::new(transport::channel(
                &target,
                transport::client_config(roots.clone(), None)?,
                Duration::from_secs(30),
            )?))
        })
        .collect::<Result<Vec<_>, sigil_sdk::SdkError>>()?;
    let mut sdk = Vec::new();
    if a.scenario.contains(&Scenario::Renew) {
        let mut admin = t.conn.connect()?;
        for _ in 0..n {
            sdk.push(attested_workload(t, &mut admin, spiffe_id).await?.0);
        }
    }
    Ok(Fixture {
        channels: Arc::new(channels),
        clients: Arc::new(clients),
        anon: Arc::new(anon),
        sdk: Arc::new(sdk),
        csrs: Arc::new(csr_pool(256)?),
    })
}

/// Join tokens for the attest scenario, made up front (concurrently) so that making them is
/// not part of what is measured.
pub(crate) async fn join_tokens(t: &Target, spiffe_id: &str, n: usize) -> Result<Arc<Vec<String>>> {
    let admin = t.conn.connect()?;
    let mut tasks = Vec::new();
    let per = n.div_ceil(32);
    for k in 0..32 {
        let mut admin = admin.clone();
        let id = spiffe_id.to_owned();
        let count = per.min(n.saturating_sub(k * per));
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                out.push(
                    admin
                        .create_join_token(pb::CreateJoinTokenRequest {
                            id_or_spiffe_id: id.clone(),
                            ttl_seconds: 3600,
                        })
                        .await?
                        .into_inner()
                        .token,
                );
            }
            Ok::<_, tonic::Status>(out)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await?.map_err(sigil_sdk::SdkError::from)?);
    }
    Ok(Arc::new(all))
}

fn jwt_request() -> pb::MintJwtSvidRequest {
    pb::MintJwtSvidRequest {
        request: Some(pb::JwtRequest {
            audiences: vec!["bench".into()],
            scopes: Vec::new(),
            ttl_seconds: 300,
        }),
    }
}

/// Runs one issuance scenario through the driver.
pub(crate) async fn run_scenario(
    s: Scenario,
    fx: &Fixture,
    tokens: Option<Arc<Vec<String>>>,
    a: &BenchArgs,
    pid: Option<u32>,
) -> Figures {
    let (clients, anon, sdk, csrs) = (
        fx.clients.clone(),
        fx.anon.clone(),
        fx.sdk.clone(),
        fx.csrs.clone(),
    );
    match s {
        Scenario::Jwt => {
            drive(s.name(), a, pid, (a.warmup, a.duration), move |i, _| {
                let mut c = clients[i % clients.len()].clone();
                async move {
                    c.mint_jwt_svid(jwt_request())
                        .await
                        .map(|_| ())
                        .map_err(code)
                }
            })
            .await
        }
        Scenario::X509 | Scenario::Mixed => {
            let mixed = s == Scenario::Mixed;
            drive(s.name(), a, pid, (a.warmup, a.duration), move |i, n| {
                let mut c = clients[i % clients.len()].clone();
                let csr = csrs[n as usize % csrs.len()].clone();
                async move {
                    // Mixed: three JWT-SVIDs to one certificate renewal.
                    if mixed && n % 4 != 0 {
                        return c
                            .mint_jwt_svid(jwt_request())
                            .await
                            .map(|_| ())
                            .map_err(code);
                    }
                    c.mint_x509_svid(pb::MintX509SvidRequest {
                        csr,
                        ttl_seconds: 600,
                        dns_names: Vec::new(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(code)
                }
            })
            .await
        }
        Scenario::Renew => {
            drive(s.name(), a, pid, (a.warmup, a.duration), move |i, _| {
                let w = sdk[i % sdk.len().max(1)].clone();
                async move { w.renew_x509_svid().await.map(|_| ()).map_err(sdk_code) }
            })
            .await
        }
        Scenario::Attest => {
            let tokens = tokens.unwrap_or_default();
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            drive(
                s.name(),
                a,
                pid,
                (Duration::ZERO, a.duration),
                move |i, n| {
                    let mut c = anon[i % anon.len()].clone();
                    let csr = csrs[n as usize % csrs.len()].clone();
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let token = tokens.get(k).cloned();
                    async move {
                        let Some(token) = token else {
                            return Err(OpError::Exhausted);
                        };
                        c.attest(pb::AttestRequest {
                            evidence: Some(pb::Evidence {
                                kind: Some(pb::evidence::Kind::JoinToken(pb::JoinTokenEvidence {
                                    token,
                                })),
                            }),
                            csr,
                            ttl_seconds: 600,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                        .map_err(code)
                    }
                },
            )
            .await
        }
        Scenario::Revoke => Figures::default(),
    }
}

/// Opens `n` watch streams (spread over connections of at most 64 streams each, each with a
/// workload certificate of its own: the broker's default per-client cap), revokes
/// `revocations` credentials one after another, and measures the delay from each revoke call's
/// return to each watcher receiving it.
pub(crate) async fn run_revoke(
    t: &Target,
    watch_on: &[&Target],
    spiffe_id: &str,
    n: usize,
    revocations: usize,
    pid: Option<u32>,
) -> Result<Figures> {
    // Watching needs a credential, and one credential may hold a bounded number of streams.
    // The streams are spread over `watch_on` (replicas on one database); revocations go
    // through `t`.
    let per_conn = 64;
    let needed = n.div_ceil(per_conn);
    let mut conns = Vec::with_capacity(needed);
    for (i, w) in watch_on.iter().enumerate() {
        let share = needed / watch_on.len() + usize::from(i < needed % watch_on.len());
        conns.extend(workloads(w, spiffe_id, share).await?);
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_message("opening watch streams");
    let mut watchers = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = conns[i / per_conn].clone();
        let tx = tx.clone();
        let ready = ready.clone();
        watchers.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(pb::WatchRequest { since_sequence: 0 });
            req.set_timeout(Duration::from_secs(3600));
            let resp = match c.watch(req).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "a watch stream did not open");
                    return;
                }
            };
            let mut s = resp.into_inner();
            let mut announced = false;
            while let Ok(Some(ev)) = s.message().await {
                if let Some(pb::watch_event::Kind::Revocations(r)) = ev.kind {
                    if r.snapshot && !announced {
                        announced = true;
                        ready.add_permits(1);
                        continue;
                    }
                    let at = Instant::now();
                    for c in r.credentials {
                        let _ = tx.send((c.credential_id, at));
                    }
                }
            }
        }));
        bar.inc(1);
    }
    drop(tx);
    let connected =
        match tokio::time::timeout(Duration::from_secs(120), ready.acquire_many(n as u32)).await {
            Ok(Ok(p)) => {
                p.forget();
                n
            }
            _ => ready.available_permits(),
        };
    bar.finish_and_clear();
    if connected < n {
        bail!("only {connected} of {n} watch streams came up within 2 minutes");
    }

    // The credentials to revoke, minted up front.
    let clients = workloads(t, spiffe_id, 1).await?;
    let mut c = clients[0].clone();
    let mut jtis = Vec::with_capacity(revocations);
    for _ in 0..revocations {
        let r = c
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                request: Some(pb::JwtRequest {
                    audiences: vec!["bench".into()],
                    scopes: Vec::new(),
                    ttl_seconds: 300,
                }),
            })
            .await?;
        jtis.push(r.into_inner().svid.map(|s| s.jti).unwrap_or_default());
    }
    let mut admin = t.conn.connect()?;
    let mut returned: HashMap<String, (Instant, Instant)> = HashMap::new();
    let mut hist = histogram();
    let mut hist_start = histogram();
    let mut deliveries = 0u64;
    for jti in &jtis {
        let started = Instant::now();
        admin
            .revoke_credential(pb::RevokeCredentialRequest {
                credential_id: jti.clone(),
                reason: "bench".into(),
            })
            .await
            .map_err(sigil_sdk::SdkError::from)?;
        returned.insert(jti.clone(), (started, Instant::now()));
        // Collect this revocation's deliveries before the next one.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = 0;
        while got < n && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                Ok(Some((id, at))) => {
                    if let Some((s, r)) = returned.get(&id) {
                        // Watchers often hear before the caller does: the broker publishes as
                        // soon as the commit is durable, before replying.
                        let d = at.saturating_duration_since(*r);
                        if let Some(h) = hist.as_mut() {
                            let _ = h.record(d.as_micros().max(1) as u64);
                        }
                        if let Some(h) = hist_start.as_mut() {
                            let _ = h
                                .record(at.saturating_duration_since(*s).as_micros().max(1) as u64);
                        }
                        deliveries += 1;
                        if &id == jti {
                            got += 1;
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {}
            }
        }
    }
    let mut f = Figures {
        ops: deliveries,
        watchers: connected,
        broker_rss_mb: pid.and_then(rss_mb),
        ..Figures::default()
    };
    let expected = (n * revocations) as u64;
    if deliveries < expected {
        f.errors
            .insert("not delivered within 10s".into(), expected - deliveries);
    }
    quantiles(&hist, &mut f);
    f.from_start_ms = hist_start.as_ref().map(|h| {
        (
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
        )
    });
    for w in watchers {
        w.abort();
    }
    Ok(f)
}

/// Latency of the admin RevokeCredential call, one at a time, for `n` fresh JWT-SVIDs.
pub(crate) async fn revoke_calls(t: &Target, spiffe_id: &str, n: usize) -> Result<Figures> {
    let clients = workloads(t, spiffe_id, 1).await?;
    let mut c = clients[0].clone();
    let mut jtis = Vec::with_capacity(n);
    for _ in 0..n {
        let r = c.mint_jwt_svid(jwt_request()).await?;
        jtis.push(r.into_inner().svid.map(|s| s.jti).unwrap_or_default());
    }
    let mut admin = t.conn.connect()?;
    let mut hist = histogram();
    let started = Instant::now();
    let mut errors = BTreeMap::new();
    for jti in jtis {
        let t0 = Instant::now();
        match admin
            .revoke_credential(pb::RevokeCredentialRequest {
                credential_id: jti,
                reason: "bench".into(),
            })
            .await
        {
            Ok(_) => {
                if let Some(h) = hist.as_mut() {
                    let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                }
            }
            Err(e) => *errors.entry(format!("{:?}", e.code())).or_default() += 1,
        }
    }
    let mut f = Figures {
        ops: n as u64,
        ops_per_s: n as f64 / started.elapsed().as_secs_f64(),
        errors,
        ..Figures::default()
    };
    quantiles(&hist, &mut f);
    Ok(f)
}
