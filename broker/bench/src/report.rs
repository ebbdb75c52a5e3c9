//! The report: one JSON object, or the table of figures with the baselines, the peer, the scale
//! run and, with `--baseline`, the performance targets (docs/PERFORMANCE.md) met or missed.

use anyhow::Result;
use serde_json::json;

use crate::args::BenchArgs;
use crate::baselines::Baseline;
use crate::driver::Figures;
use crate::populate::{ALTERNATE_ROUNDS, Scale};
use crate::target::Target;

/// Prints what a run measured.
#[allow(clippy::too_many_arguments)]
pub(crate) fn report(
    a: &BenchArgs,
    use_embedded: bool,
    target: &Target,
    results: &[(String, Figures)],
    echo: Option<&Figures>,
    base: Option<&Baseline>,
    peer: Option<&Result<Figures, String>>,
    scale: Option<&Scale>,
) -> Result<()> {
    let jwt = by_name(results, "jwt");
    let x509 = by_name(results, "x509");
    let cfssl = peer.and_then(|p| p.as_ref().ok());
    if a.json {
        let scen: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(k, f)| (k.clone(), figures_json(f)))
            .collect();
        let mut out = json!({"scenarios": scen, "concurrency": a.concurrency, "connections": a.connections, "embedded": use_embedded});
        if let Some(b) = base {
            out["baseline"] = json!({
                "tls_echo_per_s": echo.map(|e| e.ops_per_s.round()),
                "tls_echo": echo.map(figures_json),
                "store_commit_per_s": b.store_commit_per_s.round(),
                "es256_sign_per_s": b.es256_sign_per_s.round(),
                "csr_issue_per_s": b.csr_issue_per_s.round(),
            });
        }
        match peer {
            Some(Ok(f)) => out["peer"] = json!({"cfssl": figures_json(f)}),
            Some(Err(why)) => out["peer"] = json!({"cfssl": {"error": why}}),
            None => {}
        }
        let mut ratios = serde_json::Map::new();
        if let (Some(j), Some(e)) = (jwt, echo) {
            ratios.insert("jwt_vs_tls_echo".into(), json!(j.ops_per_s / e.ops_per_s));
        }
        if let (Some(x), Some(c)) = (x509, cfssl) {
            ratios.insert("x509_vs_cfssl".into(), json!(x.ops_per_s / c.ops_per_s));
        }
        if let Some((p, size, ready, again, empty)) = scale {
            let vs: serde_json::Map<String, serde_json::Value> = again
                .iter()
                .filter_map(|(k, f)| {
                    by_name(empty, k)
                        .filter(|e| e.ops_per_s > 0.0 && k != "revoke_call")
                        .map(|e| (k.clone(), json!(f.ops_per_s / e.ops_per_s)))
                })
                .collect();
            out["populated"] = json!({
                "ledger_rows": p.rows, "live_revocations": p.revocations,
                "populate_s": p.took.as_secs_f64(), "store_mb": (*size as f64 / 1e6).round(),
                "ready_after_restart_ms": ready.as_millis() as u64,
                "scenarios": again.iter().map(|(k, f)| (k.clone(), figures_json(f))).collect::<serde_json::Map<_, _>>(),
                "empty_alternated": empty.iter().map(|(k, f)| (k.clone(), figures_json(f))).collect::<serde_json::Map<_, _>>(),
                "alternate_rounds": ALTERNATE_ROUNDS,
                "vs_empty": vs,
            });
        }
        out["ratios"] = serde_json::Value::Object(ratios);
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let place = if use_embedded {
        "a broker process started for this run".to_owned()
    } else {
        target.url.clone()
    };
    println!(
        "against {place}; issuance: {} in flight over {} TLS connections, {}",
        a.concurrency,
        a.connections,
        match a.count {
            Some(c) => format!("{c} operations measured"),
            None => format!("{} measured", sigil_broker::config::dur::format(a.duration)),
        }
    );
    print_table(results);
    if results.iter().any(|(_, f)| f.watchers > 0) {
        println!(
            "revoke@N: latency from the revoke call's return to each of N watch streams receiving it"
        );
        println!(
            "          (watchers usually hear before the caller: the broker publishes once the commit is durable)"
        );
        for (k, f) in results.iter().filter(|(_, f)| f.watchers > 0) {
            if let Some((p50, p99, max)) = f.from_start_ms {
                println!(
                    "          {k} from the call's start: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
                );
            }
        }
    }
    if let Some(b) = base {
        println!();
        println!("baseline, measured now:");
        if let Some(e) = echo {
            println!(
                "  gRPC echo over the same TLS connections  {:>9.0}/s  (grpc.health.v1/Check, p99 {:.2} ms)",
                e.ops_per_s, e.p99_ms
            );
        }
        println!(
            "  durable store commit (one fsync)         {:>9.0}/s  (one core)",
            b.store_commit_per_s
        );
        println!(
            "  ES256 sign                               {:>9.0}/s  (one core)",
            b.es256_sign_per_s
        );
        println!(
            "  CSR check + leaf sign                    {:>9.0}/s  (one core)",
            b.csr_issue_per_s
        );
        if let Some(j) = jwt {
            println!(
                "  jwt mint = {:.0}% of the echo rate, {:.1}x the single-commit rate, {:.0}% of raw ES256 signing",
                echo.map(|e| 100.0 * j.ops_per_s / e.ops_per_s)
                    .unwrap_or(0.0),
                j.ops_per_s / b.store_commit_per_s,
                100.0 * j.ops_per_s / b.es256_sign_per_s
            );
        }
        if let Some(x) = x509 {
            println!(
                "  x509 mint = {:.1}x the single-commit rate, {:.0}% of raw CSR check + sign",
                x.ops_per_s / b.store_commit_per_s,
                100.0 * x.ops_per_s / b.csr_issue_per_s
            );
        }
    }
    match peer {
        Some(Ok(c)) => {
            println!();
            println!(
                "peer: cfssl serve (plain HTTP, stores nothing), same CSRs and concurrency: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms{}",
                c.ops_per_s,
                c.p50_ms,
                c.p99_ms,
                if c.errors.is_empty() {
                    String::new()
                } else {
                    format!(", {} errors", c.errors.values().sum::<u64>())
                }
            );
            if let Some(x) = x509 {
                println!("  sigil x509 = {:.2}x cfssl", x.ops_per_s / c.ops_per_s);
            }
        }
        Some(Err(why)) => {
            println!();
            println!("peer: cfssl not measured: {why}");
        }
        None => {}
    }
    if let Some((p, size, ready, again, empty)) = scale {
        println!();
        println!(
            "scale: {} ledger rows and {} live revocations written in {:.1}s (store {:.0} MB); broker ready {} ms after restart",
            p.rows,
            p.revocations,
            p.took.as_secs_f64(),
            *size as f64 / 1e6,
            ready.as_millis()
        );
        println!(
            "populated and a fresh empty broker measured by turns ({ALTERNATE_ROUNDS} runs each, ABBA); means:"
        );
        print_table(again);
        println!("empty store:");
        print_table(empty);
        for (k, f) in again {
            if let Some(e) = by_name(empty, k).filter(|e| e.ops_per_s > 0.0 && k != "revoke_call") {
                println!(
                    "  {k}: {:.0}% of the empty-store rate",
                    100.0 * f.ops_per_s / e.ops_per_s
                );
            }
        }
    }
    if a.baseline {
        println!();
        targets(results, echo, cfssl, scale);
    }
    Ok(())
}

fn figures_json(f: &Figures) -> serde_json::Value {
    json!({
        "ops_per_s": f.ops_per_s.round(), "p50_ms": f.p50_ms, "p90_ms": f.p90_ms, "p99_ms": f.p99_ms, "max_ms": f.max_ms,
        "ops": f.ops, "errors": f.errors.values().sum::<u64>(), "errors_by_code": f.errors,
        "broker_cores": f.broker_cores, "broker_rss_mb": f.broker_rss_mb.map(f64::round),
        "watchers": (f.watchers > 0).then_some(f.watchers),
        "from_call_start_ms": f.from_start_ms.map(|(a, b, c)| json!({"p50": a, "p99": b, "max": c})),
    })
}

fn by_name<'a>(r: &'a [(String, Figures)], name: &str) -> Option<&'a Figures> {
    r.iter().find(|(k, _)| k == name).map(|(_, f)| f)
}

fn print_table(results: &[(String, Figures)]) {
    println!(
        "{:<14} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>12} {:>11}",
        "scenario",
        "ops/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "broker cpu",
        "broker rss"
    );
    for (k, f) in results {
        let errs: u64 = f.errors.values().sum();
        let cpu = f
            .broker_cores
            .map(|c| format!("{c:.2} cores"))
            .unwrap_or_else(|| "-".into());
        let rss = f
            .broker_rss_mb
            .map(|r| format!("{r:.0} MB"))
            .unwrap_or_else(|| "-".into());
        let rate = if f.watchers > 0 {
            format!("{} deliv.", f.ops)
        } else {
            format!("{:.0}", f.ops_per_s)
        };
        println!(
            "{:<14} {:>10} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>12} {:>11}",
            k, rate, f.p50_ms, f.p90_ms, f.p99_ms, f.max_ms, errs, cpu, rss
        );
        for (code, n) in &f.errors {
            println!("               {n} x {code}");
        }
    }
}

/// The performance targets (docs/PERFORMANCE.md) against this run's figures.
fn targets(
    results: &[(String, Figures)],
    echo: Option<&Figures>,
    cfssl: Option<&Figures>,
    scale: Option<&Scale>,
) {
    let mark = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "not measured",
    };
    let row = |what: &str, target: &str, got: String, ok: Option<bool>| {
        println!("  {what:<46} {target:<30} {got:<36} {}", mark(ok));
    };
    println!(
        "targets (2 cores, client on the same machine, TLS, every issuance durable with its audit entry):"
    );
    let jwt = by_name(results, "jwt");
    let x509 = by_name(results, "x509");
    if let Some(j) = jwt {
        let ratio = echo.map(|e| j.ops_per_s / e.ops_per_s);
        row(
            "JWT-SVID mint",
            ">= 20000/s and >= 50% of echo",
            format!(
                "{:.0}/s, {}",
                j.ops_per_s,
                ratio.map_or("echo not measured".into(), |r| format!(
                    "{:.0}% of echo",
                    r * 100.0
                ))
            ),
            Some(j.ops_per_s >= 20_000.0 && ratio.is_some_and(|r| r >= 0.5)),
        );
        row(
            "JWT-SVID p99 at 64 in flight",
            "<= 10 ms",
            format!("{:.2} ms", j.p99_ms),
            Some(j.p99_ms <= 10.0),
        );
    }
    if let Some(x) = x509 {
        let ratio = cfssl.map(|c| x.ops_per_s / c.ops_per_s);
        row(
            "X.509-SVID from CSR",
            ">= 8000/s and >= 2x cfssl",
            format!(
                "{:.0}/s, {}",
                x.ops_per_s,
                ratio.map_or("cfssl not measured".into(), |r| format!("{r:.2}x cfssl"))
            ),
            Some(x.ops_per_s >= 8_000.0 && ratio.is_some_and(|r| r >= 2.0)),
        );
        row(
            "X.509-SVID p99",
            "<= 15 ms",
            format!("{:.2} ms", x.p99_ms),
            Some(x.p99_ms <= 15.0),
        );
    }
    match scale {
        Some((p, _, ready, again, empty)) => {
            let worst = again
                .iter()
                .filter(|(k, _)| k != "revoke_call")
                .filter_map(|(k, f)| by_name(empty, k).map(|e| f.ops_per_s / e.ops_per_s))
                .fold(f64::INFINITY, f64::min);
            row(
                &format!(
                    "issuance at {} rows / {} revocations",
                    p.rows, p.revocations
                ),
                "within 10% of empty",
                format!("{:.0}% of empty (worst scenario)", worst * 100.0),
                Some(worst >= 0.9),
            );
            if let Some(r) = by_name(again, "revoke_call") {
                row(
                    "revoke call p99, populated",
                    "<= 5 ms",
                    format!("{:.2} ms", r.p99_ms),
                    Some(r.p99_ms <= 5.0),
                );
            }
            row(
                "broker ready after restart",
                "<= 2 s",
                format!("{} ms", ready.as_millis()),
                Some(ready.as_millis() <= 2000),
            );
        }
        None => row("scale (--populate)", "", String::new(), None),
    }
    let revoke = results
        .iter()
        .filter(|(_, f)| f.watchers > 0)
        .max_by_key(|(_, f)| f.watchers);
    match revoke {
        Some((_, f)) => {
            let p99 = f.from_start_ms.map(|x| x.1).unwrap_or(f.p99_ms);
            row(
                &format!("revocation reaching {} watchers", f.watchers),
                "p99 <= 1 s (stretch 100 ms)",
                format!("p99 {p99:.1} ms from the call's start"),
                Some(p99 <= 1000.0 && f.errors.is_empty()),
            );
            row(
                &format!("broker RSS with {} watchers", f.watchers),
                "<= 500 MB",
                f.broker_rss_mb.map_or("-".into(), |r| format!("{r:.0} MB")),
                f.broker_rss_mb.map(|r| r <= 500.0),
            );
        }
        None => row("revocation fan-out", "", String::new(), None),
    }
}
