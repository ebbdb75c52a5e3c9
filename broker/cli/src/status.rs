//! `sigil status`: is each broker up and able to issue (gRPC health), and who am I there —
//! what `vault status` and `step ca health` answer. `--wait` polls until every broker serves,
//! for scripts that start one.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;
use sigil_proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::conn::Conn;

/// `sigil status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Wait up to this long (e.g. `30s`) for every broker to serve, instead of answering at
    /// once.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

struct One {
    url: String,
    status: &'static str,
    error: Option<String>,
}

async fn check(conn: &Conn, url: &str) -> One {
    let mut c = conn.clone();
    c.broker = Some(url.to_owned());
    let answer = async {
        let (ch, _) = c.channel()?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(sigil_sdk::SdkError::from)?
            .into_inner();
        anyhow::Ok(r.status())
    };
    let (status, error) =
        match tokio::time::timeout(Duration::from_secs(5), answer).await {
            Ok(Ok(ServingStatus::Serving)) => ("serving", None),
            Ok(Ok(_)) => (
                "not serving",
                Some("the broker runs but cannot issue (its store cannot commit; see its log and /readyz)".to_owned()),
            ),
            Ok(Err(e)) => ("unreachable", Some(format!("{e:#}"))),
            Err(_) => ("unreachable", Some("no answer within 5 s".to_owned())),
        };
    One {
        url: url.to_owned(),
        status,
        error,
    }
}

/// `sigil status`.
pub(crate) async fn run(a: StatusArgs) -> Result<()> {
    let deadline = a.wait.map(|w| Instant::now() + w);
    let (paths, all) = loop {
        // Resolved again each time: a broker that is starting writes its URL file when it
        // listens.
        let paths = a.conn.resolve_paths()?;
        let urls: Vec<String> = paths
            .broker
            .split(',')
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        let mut all = Vec::with_capacity(urls.len());
        for u in &urls {
            all.push(check(&a.conn, u).await);
        }
        let done = all.iter().all(|o| o.status == "serving");
        match deadline {
            Some(d) if !done && Instant::now() < d => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            _ => break (paths, all),
        }
    };
    let serving = all.iter().filter(|o| o.status == "serving").count();
    let who = if serving > 0 {
        a.conn
            .connect()?
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    } else {
        None
    };
    if a.json {
        let brokers: Vec<_> = all
            .iter()
            .map(|o| json!({"url": o.url, "status": o.status, "error": o.error}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "brokers": brokers,
                "profile": paths.profile,
                "operator": who.as_ref().map(|w| json!({"name": w.name, "role": w.role})),
                "cli_version": sigil_broker::VERSION,
            }))?
        );
    } else {
        for o in &all {
            match &o.error {
                None => println!("{:<32} {}", o.url, o.status),
                Some(e) => println!("{:<32} {}: {e}", o.url, o.status),
            }
        }
        if let Some(w) = &who {
            let profile = paths
                .profile
                .as_deref()
                .map(|p| format!(", profile {p}"))
                .unwrap_or_default();
            println!("operator {:?} (role {}){profile}", w.name, w.role);
        }
    }
    if serving < all.len() {
        let waited = a
            .wait
            .map(|w| format!(" after waiting {}", humantime::format_duration(w)))
            .unwrap_or_default();
        // Exit code 5 (unavailable), like any call that found no broker to answer.
        let e: anyhow::Error = sigil_sdk::SdkError::from(tonic::Status::unavailable(format!(
            "{} of {} brokers serving{waited}",
            serving,
            all.len()
        )))
        .into();
        return Err(e);
    }
    if all.is_empty() {
        bail!("no broker URL");
    }
    Ok(())
}
