//! `sigil audit ...`: check the audit log's hash chain (through the broker or offline), export
//! entries, tail them.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use sigil_proto::v1 as pb;

use crate::Conn;
use crate::serve::shutdown_signal;

/// `sigil audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain; names the first bad entry.
    Verify {
        /// Read the store file directly instead of asking the broker: for a stopped broker's
        /// data dir or a copy of one (needs the master key).
        #[arg(long)]
        offline: bool,
        /// Print JSON ({"intact", "entries", "first_bad_sequence", "reason"}).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
        /// With --offline: where the store is, when not the data dir's own.
        #[command(flatten)]
        store: crate::serve::StoreArgs,
    },
    /// Print entries as JSON lines.
    Export {
        /// First sequence number.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Only entries since this time: RFC 3339 (2026-11-22T10:00:00Z) or a duration ago (1h).
        #[arg(long)]
        since: Option<String>,
        /// Only entries about this identity (id or SPIFFE ID).
        #[arg(long)]
        identity: Option<String>,
        /// Only entries whose action starts with this (e.g. `jwt.mint`, `identity.`).
        #[arg(long)]
        action: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the newest entries; with --follow, keep printing new ones as they are written.
    Tail {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        /// Keep going.
        #[arg(short, long)]
        follow: bool,
        /// Only entries about this identity.
        #[arg(long)]
        identity: Option<String>,
        /// Only entries whose action starts with this.
        #[arg(long)]
        action: Option<String>,
        /// Print the entries as stored (JSON lines) instead of one readable line each.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil audit ...`.
pub(crate) async fn run(cmd: AuditCmd) -> Result<()> {
    match cmd {
        AuditCmd::Verify {
            offline: true,
            json,
            conn,
            store: store_args,
        } => {
            let dir = conn.data_dir.as_deref().ok_or_else(|| {
                anyhow!(
                    "--offline needs --data-dir (a stopped broker's data dir, or a copy of one)"
                )
            })?;
            let mut cfg = sigil_broker::config::Config::load(dir)?;
            store_args.apply(&mut cfg)?;
            let sealer =
                sigil_broker::seal::Sealer::new(&sigil_broker::server::load_master_key(&cfg)?);
            let store = cfg.store()?;
            sigil_broker::store::check_master_key(&store, &sealer)?;
            let inspection = sigil_broker::store::check_offline(&store)?;
            if inspection.unclean {
                println!(
                    "note: the store was not closed cleanly (a crash or kill -9); its crash recovery ran on an in-memory view of it, and the file was not changed (`sigil serve` recovers it for real)"
                );
            }
            let chain = sigil_broker::store::read_audit_offline(&store)?;
            let report = sigil_broker::audit::verify_stored(&sealer, &chain);
            let checkpoint = chain.checkpoint;
            if json {
                return print_verify_json(&report);
            }
            match report {
                sigil_broker::audit::ChainReport::Intact { entries } => match &checkpoint {
                    None => println!("audit log intact: {entries} entries, ending at its anchor"),
                    Some(c) => println!(
                        "audit log intact: entries {} to {entries} (entries up to {} were removed by retention at {}; the checkpoint verifies)",
                        c.seq + 1,
                        c.seq,
                        sigil_broker::clock::rfc3339(c.time / 1_000_000_000)
                    ),
                },
                sigil_broker::audit::ChainReport::Broken { seq, reason } => {
                    bail!("audit log is broken at entry {seq}: {reason}")
                }
            }
        }
        AuditCmd::Verify {
            offline: false,
            json,
            conn,
            ..
        } => {
            let mut c = conn.connect()?;
            let r = c
                .verify_audit(pb::VerifyAuditRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "intact": r.intact, "entries": r.entries,
                        "first_bad_sequence": (!r.intact).then_some(r.first_bad_sequence),
                        "reason": (!r.intact).then_some(&r.reason),
                    }))?
                );
                if !r.intact {
                    bail!("audit log is broken at entry {}", r.first_bad_sequence);
                }
                return Ok(());
            }
            if r.intact {
                println!("audit log intact: {} entries", r.entries);
            } else {
                bail!(
                    "audit log is broken at entry {}: {}",
                    r.first_bad_sequence,
                    r.reason
                );
            }
        }
        AuditCmd::Export {
            from,
            since,
            identity,
            action,
            conn,
        } => {
            let mut c = conn.connect()?;
            let since_unix_nanos = match since.as_deref() {
                Some(s) => parse_since(s)?,
                None => 0,
            };
            let mut next = from.max(1);
            loop {
                let r = c
                    .list_audit(pb::ListAuditRequest {
                        from_sequence: next,
                        limit: 1000,
                        since_unix_nanos,
                        identity: identity.clone().unwrap_or_default(),
                        action: action.clone().unwrap_or_default(),
                        last: 0,
                    })
                    .await
                    .map_err(sigil_sdk::SdkError::from)?
                    .into_inner();
                for e in &r.entries {
                    println!("{e}");
                }
                if r.entries.len() < 1000 {
                    break;
                }
                next = r.next_sequence;
            }
        }
        AuditCmd::Tail {
            lines,
            follow,
            identity,
            action,
            json,
            conn,
        } => {
            let show = |e: &String| {
                if json {
                    println!("{e}");
                } else {
                    println!("{}", readable(e));
                }
            };
            let mut c = conn.connect()?;
            let base = pb::ListAuditRequest {
                identity: identity.unwrap_or_default(),
                action: action.unwrap_or_default(),
                ..Default::default()
            };
            let r = c
                .list_audit(pb::ListAuditRequest {
                    last: lines.max(1),
                    ..base.clone()
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            for e in &r.entries {
                show(e);
            }
            let mut next = r.next_sequence;
            if follow {
                loop {
                    tokio::select! {
                        _ = shutdown_signal() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    let r = c
                        .list_audit(pb::ListAuditRequest {
                            from_sequence: next,
                            limit: 1000,
                            ..base.clone()
                        })
                        .await
                        .map_err(sigil_sdk::SdkError::from)?
                        .into_inner();
                    for e in &r.entries {
                        show(e);
                    }
                    next = r.next_sequence;
                }
            }
        }
    }
    Ok(())
}

/// Nanoseconds since the epoch for `--since`: RFC 3339, or a duration ago.
fn parse_since(s: &str) -> Result<i64> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t.unix_timestamp_nanos() as i64);
    }
    let ago = humantime::parse_duration(s).map_err(|_| {
        anyhow!(
            "--since {s:?}: give an RFC 3339 time (2026-11-22T10:00:00Z) or a duration ago (1h)"
        )
    })?;
    let now = std::time::SystemTime::now();
    Ok(sigil_broker::clock::unix_nanos(
        now.checked_sub(ago).unwrap_or(std::time::UNIX_EPOCH),
    ))
}

/// An audit entry in one line for people: sequence, RFC 3339 time, decision, action, target,
/// actor and reason.
fn readable(e: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(e) else {
        return e.to_owned();
    };
    let time = v["time"]
        .as_i64()
        .map(|ns| sigil_broker::clock::rfc3339(ns.div_euclid(1_000_000_000)))
        .unwrap_or_default();
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    let gate = v["gate"]
        .as_str()
        .map(|g| format!(" [{g}]"))
        .unwrap_or_default();
    let target = match v["detail"]["spiffe_id"].as_str() {
        Some(id) if id != s("target") => format!("{} ({id})", s("target")),
        _ => s("target"),
    };
    format!(
        "{:>8} {time} {:<5} {:<28} {target} by {}{gate}: {}",
        v["seq"].as_u64().unwrap_or(0),
        s("decision").to_uppercase(),
        s("action"),
        s("actor"),
        s("reason")
    )
}

fn print_verify_json(report: &sigil_broker::audit::ChainReport) -> Result<()> {
    let (intact, entries, bad, reason) = match report {
        sigil_broker::audit::ChainReport::Intact { entries } => (true, *entries, None, None),
        sigil_broker::audit::ChainReport::Broken { seq, reason } => {
            (false, 0, Some(*seq), Some(reason.clone()))
        }
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "intact": intact, "entries": entries, "first_bad_sequence": bad, "reason": reason,
        }))?
    );
    if let Some(seq) = bad {
        bail!("audit log is broken at entry {seq}");
    }
    Ok(())
}
