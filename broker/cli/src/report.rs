//! `sigil report`: the governance report (inventory, findings, programme metrics).

use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use sigil_broker::clock::rfc3339;
use sigil_proto::v1 as pb;

use crate::Conn;
use crate::output::print_table;

/// `sigil report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Unused this long counts as an orphan / excess privilege (default: [governance]).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub unused_after: Option<Duration>,
    /// Report identities expiring within this.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub expiring_within: Option<Duration>,
    /// Report identities whose max TTL is above this.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_ttl_policy: Option<Duration>,
    /// Print JSON (for tools).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil report`.
pub(crate) async fn run(a: ReportArgs) -> Result<()> {
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs()).unwrap_or(0);
    let r = a
        .conn
        .connect()?
        .report(pb::ReportRequest {
            unused_after_seconds: secs(a.unused_after),
            expiring_within_seconds: secs(a.expiring_within),
            max_ttl_policy_seconds: secs(a.max_ttl_policy),
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    let v: serde_json::Value =
        serde_json::from_str(&r.json).context("the broker's report is not JSON")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let ids = v["identities"].as_array().cloned().unwrap_or_default();
    println!("IDENTITIES ({})", ids.len());
    let mut rows = vec![[
        "SPIFFE ID".to_owned(),
        "OWNER".to_owned(),
        "STATUS".to_owned(),
        "LAST USED".to_owned(),
        "LIVE".to_owned(),
        "EXPIRES".to_owned(),
    ]];
    for i in &ids {
        let last = i["last_used"]
            .as_i64()
            .filter(|t| *t > 0)
            .map(rfc3339)
            .unwrap_or_else(|| "never".into());
        let gone = if i["owner_active"] == false {
            " (gone)"
        } else {
            ""
        };
        rows.push([
            i["spiffe_id"].as_str().unwrap_or("").to_owned(),
            format!("{}{gone}", i["owner"].as_str().unwrap_or("")),
            i["status"].as_str().unwrap_or("").to_owned(),
            last,
            i["live_credentials"].as_u64().unwrap_or(0).to_string(),
            rfc3339(i["expires_at"].as_i64().unwrap_or(0)),
        ]);
    }
    print_table(&rows);
    let findings = v["findings"].as_array().cloned().unwrap_or_default();
    println!();
    println!("FINDINGS ({})", findings.len());
    for f in &findings {
        println!(
            "[{:<6}] {:<22} {} {}",
            f["severity"].as_str().unwrap_or(""),
            f["kind"].as_str().unwrap_or(""),
            f["spiffe_id"].as_str().unwrap_or(""),
            f["message"].as_str().unwrap_or("")
        );
        if !f["recommendation"].is_null() {
            println!("         -> {}", f["recommendation"]);
        }
    }
    let p = &v["programme"];
    println!();
    println!("PROGRAMME");
    println!("  identities:                 {}", p["identities"]);
    println!(
        "  ownership coverage:         {:.0}%",
        p["ownership_coverage"].as_f64().unwrap_or(0.0) * 100.0
    );
    println!("  orphan candidates:          {}", p["orphans"]);
    println!("  retired:                    {}", p["retired"]);
    println!(
        "  median credential lifetime: {}",
        sigil_broker::config::dur::format(Duration::from_secs(
            p["median_credential_lifetime_secs"].as_u64().unwrap_or(0)
        ))
    );
    match p["mean_leak_to_revocation_ms"].as_f64() {
        Some(ms) => println!(
            "  leak report to revocation:  {ms:.1} ms mean over {} incident(s)",
            p["incidents"]
        ),
        None => println!("  leak report to revocation:  no incidents in the window"),
    }
    Ok(())
}
