//! `sigil bench`: load against a real broker over real TLS, every issuance durable with its
//! audit entry. Prints throughput and latency percentiles, the broker's CPU and memory and,
//! with `--baseline`, the raw costs measured in the same run (one durable store commit, one
//! ES256 signature, one CSR check plus leaf signature), so results read as ratios on whatever
//! machine runs them.
//!
//! `--embedded` (the default) runs the broker as a child process on a temporary data dir, so
//! its CPU and memory are measured apart from the load generator's (both share the machine).
//!
//! Layout, in the order a run goes through it:
//! - `args`: [`BenchArgs`], with the [`Scenario`]s and the [`Peer`] they name.
//! - `target`: the broker under load, embedded (a child process) or [`External`]; its CPU and
//!   memory.
//! - `scenarios`: the bench identity and its workload connections, CSR pools, join tokens, and
//!   the bodies of the jwt, x509, attest, renew, mixed and revoke scenarios.
//! - `driver`: the load driver: concurrency, warm-up, latency histograms, [`Figures`].
//! - `baselines`: [`Baseline`], the raw costs, and the gRPC echo over the same connections.
//! - `peer`: peers given the same load and CSRs (cfssl).
//! - `populate`: `--populate`, filling a stopped broker's store for the scale figures.
//! - `replicas`: `--store postgres`, the replica figures on a private PostgreSQL server.
//! - `report`: the table or the JSON, and the performance targets.
//! - here: [`run`], which strings them together, and the two steps it repeats: the issuance
//!   scenarios on one broker, and a populated and an empty broker measured by turns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use sigil_proto::v1 as pb;

mod args;
mod baselines;
mod driver;
mod peer;
mod populate;
mod replicas;
mod report;
mod scenarios;
mod target;

pub use args::{BenchArgs, LimitsMode, Peer, Scenario, StoreKind};
pub use baselines::{Baseline, baseline};
pub use driver::Figures;
pub use target::External;

use baselines::tls_echo;
use driver::mean;
use populate::ALTERNATE_ROUNDS;
use scenarios::{bench_identity, fixture, join_tokens, revoke_calls, run_revoke, run_scenario};
use target::{Target, embedded, spawn_broker, stop_broker};

/// Runs `sigil bench`.
///
/// `external` is the broker to measure when the caller named one; without it (or with
/// `--embedded`) the bench starts its own.
pub async fn run(mut a: BenchArgs, external: Option<External>) -> Result<()> {
    let use_embedded = a.embedded || external.is_none();
    if a.scenario.is_empty() {
        a.scenario = if a.baseline {
            vec![Scenario::Jwt, Scenario::X509, Scenario::Revoke]
        } else {
            vec![Scenario::Jwt, Scenario::X509]
        };
    }
    if a.watchers.is_empty() {
        a.watchers = vec![if a.baseline { 10_000 } else { 1000 }];
    }
    target::LIMITS_OFF.store(
        a.limits == args::LimitsMode::Off,
        std::sync::atomic::Ordering::Relaxed,
    );
    if a.store == Some(StoreKind::Postgres) {
        let r = replicas::run(&mut a).await?;
        return replicas::report(&r, a.json);
    }
    let populate = match a.populate {
        Some(0) => None,
        Some(n) => Some(n),
        None if a.baseline && use_embedded => Some(1_000_000),
        None => None,
    };
    if populate.is_some() && !use_embedded {
        bail!("--populate needs an embedded broker (it stops, fills and restarts it)");
    }
    let peer = a.peer.or((a.baseline).then_some(Peer::Cfssl));
    let mut target = match external {
        Some(e) if !use_embedded => Target {
            url: e.url.clone(),
            bundle_pem: e.bundle_pem.clone(),
            conn: e,
            broker_pid: None,
            child: None,
            own: None,
        },
        _ => embedded().await?,
    };
    let spiffe_id = bench_identity(&target).await?;
    let mut scenarios = a.scenario.clone();
    scenarios.sort();
    scenarios.dedup();

    let (mut results, echo, csrs) =
        issuance(&target, &spiffe_id, &scenarios, &a, a.baseline).await?;
    if scenarios.contains(&Scenario::Revoke) {
        for n in a.watchers.clone() {
            let f = run_revoke(
                &target,
                &[&target],
                &spiffe_id,
                n,
                a.revocations.max(1),
                target.broker_pid,
            )
            .await?;
            results.push((format!("revoke@{n}"), f));
        }
    }
    if populate.is_some() || a.baseline {
        results.push((
            "revoke_call".into(),
            revoke_calls(&target, &spiffe_id, 200).await?,
        ));
    }
    let base = if a.baseline {
        Some(tokio::task::spawn_blocking(baseline).await??)
    } else {
        None
    };
    let peer_figures = match peer {
        Some(Peer::Cfssl) => match peer::start_cfssl().await {
            Ok(c) => Some(
                peer::drive_cfssl(&c, &csrs, &a)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            Err(e) => Some(Err(e.to_string())),
        },
        None => None,
    };

    // Scale: fill the store, restart, measure again.
    let mut scale = None;
    if let Some(rows) = populate {
        let mut admin = target.conn.connect()?;
        let ident = admin
            .get_identity(pb::GetIdentityRequest {
                id_or_spiffe_id: spiffe_id.clone(),
            })
            .await
            .map_err(sigil_sdk::SdkError::from)?
            .into_inner();
        let (_, data, master) = target
            .own
            .as_ref()
            .ok_or_else(|| anyhow!("--populate needs an embedded broker"))?;
        let (data, master) = (data.clone(), master.clone());
        if let Some(c) = target.child.as_mut() {
            stop_broker(c).await?;
        }
        let bar = if a.json {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(0)
        };
        bar.set_message("populating the store");
        let p = populate::populate(
            &data,
            &master,
            &ident.id,
            &spiffe_id,
            rows,
            a.live_revocations,
            &bar,
        )
        .await?;
        bar.finish_and_clear();
        let size: u64 = sigil_broker::store::StoreConfig::in_data_dir(&data)
            .files()
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let (child, url, ready) = spawn_broker(&data, &master).await?;
        target.broker_pid = child.id();
        target.child = Some(child);
        target.url = url.clone();
        target.conn.url = url;
        // The comparison with an empty store: a fresh broker measured alternately with the
        // populated one, so both see the same stretch of a shared machine.
        let reference = embedded().await?;
        let reference_id = bench_identity(&reference).await?;
        let issuing: Vec<Scenario> = scenarios
            .iter()
            .copied()
            .filter(|s| matches!(s, Scenario::Jwt | Scenario::X509))
            .collect();
        let full = a.duration;
        a.duration = (full / 2).max(Duration::from_secs(2));
        let alternated = alternate(
            (&target, &spiffe_id),
            (&reference, &reference_id),
            &issuing,
            &a,
        )
        .await;
        a.duration = full;
        let (mut again, empty) = alternated?;
        drop(reference);
        again.push((
            "revoke_call".into(),
            revoke_calls(&target, &spiffe_id, 200).await?,
        ));
        scale = Some((p, size, ready, again, empty));
    }

    report::report(
        &a,
        use_embedded,
        &target,
        &results,
        echo.as_ref(),
        base.as_ref(),
        peer_figures.as_ref(),
        scale.as_ref(),
    )
}

/// The issuance scenarios (and the transport echo) against `t`.
async fn issuance(
    t: &Target,
    spiffe_id: &str,
    scenarios: &[Scenario],
    a: &BenchArgs,
    echo: bool,
) -> Result<(Vec<(String, Figures)>, Option<Figures>, Arc<Vec<Vec<u8>>>)> {
    let mut out = Vec::new();
    let fx = fixture(t, spiffe_id, a).await?;
    for s in scenarios.iter().copied().filter(|s| *s != Scenario::Revoke) {
        let tokens = if s == Scenario::Attest {
            Some(join_tokens(t, spiffe_id, a.attest_tokens).await?)
        } else {
            None
        };
        out.push((
            s.name().to_owned(),
            run_scenario(s, &fx, tokens, a, t.broker_pid).await,
        ));
    }
    let echo = if echo {
        Some(tls_echo(&fx, a, t.broker_pid).await)
    } else {
        None
    };
    Ok((out, echo, fx.csrs.clone()))
}

/// Runs each of `scenarios` on `first` and `second` by turns and returns each one's mean
/// figures over [`ALTERNATE_ROUNDS`].
async fn alternate(
    first: (&Target, &str),
    second: (&Target, &str),
    scenarios: &[Scenario],
    a: &BenchArgs,
) -> Result<(Vec<(String, Figures)>, Vec<(String, Figures)>)> {
    let mut runs: [BTreeMap<String, Vec<Figures>>; 2] = Default::default();
    for round in 0..ALTERNATE_ROUNDS {
        for s in scenarios {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                let (t, id) = if which == 0 { first } else { second };
                let (r, _, _) = issuance(t, id, &[*s], a, false).await?;
                for (k, f) in r {
                    runs[which].entry(k).or_default().push(f);
                }
            }
        }
    }
    let means = |m: &BTreeMap<String, Vec<Figures>>| {
        scenarios
            .iter()
            .filter_map(|s| m.get(s.name()).map(|f| (s.name().to_owned(), mean(f))))
            .collect::<Vec<_>>()
    };
    Ok((means(&runs[0]), means(&runs[1])))
}
