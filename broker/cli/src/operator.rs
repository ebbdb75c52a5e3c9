//! Operator commands over the admin API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use serde_json::json;
use sigil_proto::v1 as pb;

use super::{
    AuditCmd, Conn, CredentialCmd, IdentityCmd, JoinTokenCmd, KeysCmd, LeakArgs, OwnerCmd,
    ReportArgs, RevokeCmd, RotateArgs,
};
use sigil_broker::clock::rfc3339;

/// `sigil identity create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// SPIFFE ID, e.g. spiffe://example.org/payments/api.
    #[arg(long)]
    pub spiffe_id: String,
    /// The person or team that answers for this identity.
    #[arg(long)]
    pub owner: String,
    /// Why it exists.
    #[arg(long)]
    pub purpose: String,
    /// Attestation selector TYPE:KEY:VALUE (repeatable; all must match).
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    /// JWT audience it may request (repeatable).
    #[arg(long = "audience")]
    pub audiences: Vec<String>,
    /// Scope it may carry (repeatable).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Scope that is minted only while an approval (`sigil approve`) is in force (repeatable;
    /// implies --scope).
    #[arg(long = "approval-scope")]
    pub approval_scopes: Vec<String>,
    /// Credential kinds: x509, jwt (comma-separated or repeated). None grants nothing.
    #[arg(long = "kind", value_delimiter = ',')]
    pub kinds: Vec<String>,
    /// Longest credential lifetime (e.g. 1h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_ttl: Option<Duration>,
    /// DNS name allowed in its certificates (repeatable).
    #[arg(long = "dns")]
    pub dns_names: Vec<String>,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Identity lifetime before it must be recertified (default: the broker's, 90d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub expires_in: Option<Duration>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil identity update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Identity id or SPIFFE ID.
    pub identity: String,
    /// New owner.
    #[arg(long)]
    pub owner: Option<String>,
    /// New purpose.
    #[arg(long)]
    pub purpose: Option<String>,
    /// Replace the selectors (repeatable).
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    /// Remove every selector.
    #[arg(long)]
    pub clear_selectors: bool,
    /// Replace the labels, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Replace the credential kinds.
    #[arg(long = "kind", value_delimiter = ',')]
    pub kinds: Vec<String>,
    /// New longest credential lifetime.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_ttl: Option<Duration>,
    /// Add an audience (repeatable).
    #[arg(long)]
    pub add_audience: Vec<String>,
    /// Remove an audience (repeatable).
    #[arg(long)]
    pub remove_audience: Vec<String>,
    /// Add a scope (repeatable).
    #[arg(long)]
    pub add_scope: Vec<String>,
    /// Remove a scope (repeatable).
    #[arg(long)]
    pub remove_scope: Vec<String>,
    /// Make a scope need approval (repeatable; adds it to the scopes too).
    #[arg(long)]
    pub add_approval_scope: Vec<String>,
    /// Stop requiring approval for a scope (repeatable; it stays a scope).
    #[arg(long)]
    pub remove_approval_scope: Vec<String>,
    /// Add a DNS name (repeatable).
    #[arg(long)]
    pub add_dns: Vec<String>,
    /// Remove a DNS name (repeatable).
    #[arg(long)]
    pub remove_dns: Vec<String>,
    /// New lifetime from now.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub expires_in: Option<Duration>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil identity retire`.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// Identity id or SPIFFE ID.
    pub identity: String,
    /// Why.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Show what would be revoked; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil identity suspend|resume`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Identity id or SPIFFE ID.
    pub identity: String,
    /// Why (recorded in the audit log and shown to the workload).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {s:?} must be KEY=VALUE"))
}

fn status_name(s: i32) -> &'static str {
    match pb::IdentityStatus::try_from(s) {
        Ok(pb::IdentityStatus::Active) => "active",
        Ok(pb::IdentityStatus::Suspended) => "suspended",
        Ok(pb::IdentityStatus::Compromised) => "compromised",
        Ok(pb::IdentityStatus::Retired) => "retired",
        _ => "unknown",
    }
}

/// The JSON form of an identity.
pub(super) fn identity_json(i: &pb::Identity) -> serde_json::Value {
    let e = i.entitlements.clone().unwrap_or_default();
    json!({
        "id": i.id, "spiffe_id": i.spiffe_id, "owner": i.owner, "purpose": i.purpose,
        "status": status_name(i.status), "status_reason": i.status_reason,
        "generation": i.generation, "expires_at": i.expires_at,
        "labels": i.labels.iter().collect::<BTreeMap<_, _>>(), "selectors": i.selectors,
        "entitlements": {
            "kinds": e.kinds, "max_ttl_seconds": e.max_ttl_seconds, "audiences": e.audiences,
            "scopes": e.scopes, "dns_names": e.dns_names, "approval_scopes": e.approval_scopes,
        },
        "created_at": i.created_at, "created_by": i.created_by,
        "updated_at": i.updated_at, "updated_by": i.updated_by, "revision": i.revision,
    })
}

fn list_or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

fn print_identity(i: &pb::Identity, as_json: bool) {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&identity_json(i)).unwrap_or_default()
        );
        return;
    }
    let e = i.entitlements.clone().unwrap_or_default();
    let status = if i.status_reason.is_empty() {
        status_name(i.status).to_owned()
    } else {
        format!("{} ({})", status_name(i.status), i.status_reason)
    };
    println!("id:          {}", i.id);
    println!("spiffe id:   {}", i.spiffe_id);
    println!("owner:       {}", i.owner);
    println!("purpose:     {}", i.purpose);
    println!("status:      {status}");
    println!("generation:  {}", i.generation);
    println!("expires:     {}", rfc3339(i.expires_at));
    println!("kinds:       {}", list_or_dash(&e.kinds));
    println!(
        "max ttl:     {}",
        sigil_broker::config::dur::format(Duration::from_secs(u64::from(e.max_ttl_seconds)))
    );
    println!("audiences:   {}", list_or_dash(&e.audiences));
    println!("scopes:      {}", list_or_dash(&e.scopes));
    if !e.approval_scopes.is_empty() {
        println!("needs approval: {}", e.approval_scopes.join(", "));
    }
    println!("dns names:   {}", list_or_dash(&e.dns_names));
    println!("selectors:   {}", list_or_dash(&i.selectors));
    let labels: Vec<String> = i
        .labels
        .iter()
        .collect::<BTreeMap<_, _>>()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("labels:      {}", list_or_dash(&labels));
    println!("created:     {} by {}", rfc3339(i.created_at), i.created_by);
    println!("updated:     {} by {}", rfc3339(i.updated_at), i.updated_by);
}

fn ttl32(d: Option<Duration>) -> u32 {
    d.map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// `sigil identity ...`.
pub(super) async fn identity(cmd: IdentityCmd) -> Result<()> {
    match cmd {
        IdentityCmd::Create(a) => {
            let mut c = a.conn.connect()?;
            if a.kinds.is_empty() {
                eprintln!(
                    "note: no --kind given, so this identity cannot be issued any credential yet (add one with `sigil identity update ID --kind x509,jwt`)"
                );
            }
            let req = pb::CreateIdentityRequest {
                spiffe_id: a.spiffe_id,
                owner: a.owner,
                purpose: a.purpose,
                labels: a.labels.into_iter().collect(),
                selectors: a.selectors,
                entitlements: Some(pb::Entitlements {
                    kinds: a.kinds,
                    max_ttl_seconds: ttl32(a.max_ttl),
                    audiences: a.audiences,
                    scopes: {
                        let mut s = a.scopes;
                        for x in &a.approval_scopes {
                            if !s.contains(x) {
                                s.push(x.clone());
                            }
                        }
                        s
                    },
                    dns_names: a.dns_names,
                    approval_scopes: a.approval_scopes,
                }),
                expires_in_seconds: a.expires_in.map(|d| d.as_secs()).unwrap_or(0),
            };
            let i = c
                .create_identity(req)
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_identity(&i, a.json);
        }
        IdentityCmd::List { json, conn } => {
            let mut c = conn.connect()?;
            let list = c
                .list_identities(pb::ListIdentitiesRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner()
                .identities;
            if json {
                let v: Vec<_> = list.iter().map(identity_json).collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!(
                    "{:<20} {:<48} {:<24} {:<11} EXPIRES",
                    "ID", "SPIFFE ID", "OWNER", "STATUS"
                );
                for i in &list {
                    println!(
                        "{:<20} {:<48} {:<24} {:<11} {}",
                        i.id,
                        i.spiffe_id,
                        i.owner,
                        status_name(i.status),
                        rfc3339(i.expires_at)
                    );
                }
            }
        }
        IdentityCmd::Show {
            identity,
            json,
            conn,
        } => {
            let mut c = conn.connect()?;
            let i = c
                .get_identity(pb::GetIdentityRequest {
                    id_or_spiffe_id: identity,
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_identity(&i, json);
        }
        IdentityCmd::Update(a) => {
            let mut c = a.conn.connect()?;
            let touches_entitlements = !a.kinds.is_empty()
                || a.max_ttl.is_some()
                || !(a.add_audience.is_empty()
                    && a.remove_audience.is_empty()
                    && a.add_scope.is_empty()
                    && a.remove_scope.is_empty()
                    && a.add_dns.is_empty()
                    && a.remove_dns.is_empty()
                    && a.add_approval_scope.is_empty()
                    && a.remove_approval_scope.is_empty());
            let entitlements = if touches_entitlements {
                let cur = c
                    .get_identity(pb::GetIdentityRequest {
                        id_or_spiffe_id: a.identity.clone(),
                    })
                    .await
                    .map_err(sigil_sdk::SdkError::from)?
                    .into_inner();
                let mut e = cur.entitlements.unwrap_or_default();
                let edit = |list: &mut Vec<String>, add: &[String], remove: &[String]| {
                    list.retain(|x| !remove.contains(x));
                    for x in add {
                        if !list.contains(x) {
                            list.push(x.clone());
                        }
                    }
                };
                edit(&mut e.audiences, &a.add_audience, &a.remove_audience);
                edit(&mut e.scopes, &a.add_scope, &a.remove_scope);
                edit(&mut e.dns_names, &a.add_dns, &a.remove_dns);
                edit(&mut e.scopes, &a.add_approval_scope, &[]);
                edit(
                    &mut e.approval_scopes,
                    &a.add_approval_scope,
                    &a.remove_approval_scope,
                );
                e.approval_scopes.retain(|x| !a.remove_scope.contains(x));
                if !a.kinds.is_empty() {
                    e.kinds = a.kinds.clone();
                }
                if a.max_ttl.is_some() {
                    e.max_ttl_seconds = ttl32(a.max_ttl);
                }
                Some(e)
            } else {
                None
            };
            let req = pb::UpdateIdentityRequest {
                id_or_spiffe_id: a.identity,
                owner: a.owner,
                purpose: a.purpose,
                set_labels: !a.labels.is_empty(),
                labels: a.labels.into_iter().collect(),
                set_selectors: !a.selectors.is_empty() || a.clear_selectors,
                selectors: a.selectors,
                entitlements,
                expires_in_seconds: a.expires_in.map(|d| d.as_secs()),
            };
            let i = c
                .update_identity(req)
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_identity(&i, a.json);
        }
        IdentityCmd::Suspend(a) => set_status(a, pb::IdentityStatus::Suspended).await?,
        IdentityCmd::Resume(a) => set_status(a, pb::IdentityStatus::Active).await?,
        IdentityCmd::Retire(a) => {
            let mut c = a.conn.connect()?;
            let r = c
                .revoke_identity(pb::RevokeIdentityRequest {
                    id_or_spiffe_id: a.identity,
                    reason: a.reason,
                    suspend: false,
                    dry_run: a.dry_run,
                    retire: true,
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_report(&r, a.json);
        }
        IdentityCmd::Recertify {
            identity,
            lifetime,
            reason,
            json,
            conn,
        } => {
            let mut c = conn.connect()?;
            let i = c
                .recertify(pb::RecertifyRequest {
                    id_or_spiffe_id: identity,
                    expires_in_seconds: lifetime.map(|d| d.as_secs()).unwrap_or(0),
                    reason,
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_identity(&i, json);
        }
    }
    Ok(())
}

async fn set_status(a: StatusArgs, status: pb::IdentityStatus) -> Result<()> {
    let mut c = a.conn.connect()?;
    let i = c
        .set_identity_status(pb::SetIdentityStatusRequest {
            id_or_spiffe_id: a.identity,
            status: status as i32,
            reason: a.reason,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    print_identity(&i, a.json);
    Ok(())
}

/// `sigil join-token ...`.
pub(super) async fn join_token(cmd: JoinTokenCmd) -> Result<()> {
    match cmd {
        JoinTokenCmd::Create {
            spiffe_id,
            ttl,
            conn,
        } => {
            let mut c = conn.connect()?;
            let r = c
                .create_join_token(pb::CreateJoinTokenRequest {
                    id_or_spiffe_id: spiffe_id,
                    ttl_seconds: ttl32(ttl),
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            println!(
                "join token for {} (identity {}), expires {}; it works once and is not stored by the broker:",
                r.spiffe_id,
                r.identity_id,
                rfc3339(r.expires_at)
            );
            println!("{}", r.token);
        }
    }
    Ok(())
}

fn credential_json(r: &pb::Credential) -> serde_json::Value {
    json!({
        "credential_id": r.credential_id, "kind": r.kind, "identity_id": r.identity_id, "spiffe_id": r.spiffe_id,
        "generation": r.generation, "audiences": r.audiences, "scopes": r.scopes, "dns_names": r.dns_names,
        "issued_at": rfc3339(r.issued_at), "expires_at": rfc3339(r.expires_at), "signing_key_id": r.signing_key_id,
        "attestation": r.attestation,
    })
}

fn print_report(r: &pb::RevocationReport, as_json: bool) {
    if as_json {
        let v = json!({
            "dry_run": r.dry_run,
            "identity": r.identity.as_ref().map(identity_json),
            "leaked": r.leaked.as_ref().map(credential_json),
            "live_credentials": r.live_credentials.iter().map(credential_json).collect::<Vec<_>>(),
            "audit_sequence": r.audit_sequence,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    let id = r.identity.clone().unwrap_or_default();
    if r.dry_run {
        println!("DRY RUN: nothing was changed.");
    }
    if let Some(l) = &r.leaked {
        println!(
            "leaked:      {} {} of {} (expires {})",
            l.kind,
            l.credential_id,
            l.spiffe_id,
            rfc3339(l.expires_at)
        );
    }
    println!("identity:    {} ({})", id.spiffe_id, id.id);
    println!(
        "status:      {}{}",
        status_name(id.status),
        if id.status_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", id.status_reason)
        }
    );
    println!("generation:  {}", id.generation);
    let verb = if r.dry_run { "would revoke" } else { "revoked" };
    println!(
        "blast radius: {verb} {} live credential(s)",
        r.live_credentials.len()
    );
    for c in &r.live_credentials {
        let aud = if c.audiences.is_empty() {
            String::new()
        } else {
            format!(" aud={}", c.audiences.join(","))
        };
        println!(
            "  {:<5} {}{aud} (expires {})",
            c.kind,
            c.credential_id,
            rfc3339(c.expires_at)
        );
    }
    if r.audit_sequence > 0 {
        println!("audit entry: {}", r.audit_sequence);
    }
}

fn print_keys(k: &pb::ListKeysResponse, as_json: bool) {
    if as_json {
        let v: Vec<_> = k
            .keys
            .iter()
            .map(|k| json!({"id": k.id, "kind": k.kind, "state": k.state, "created_at": k.created_at, "not_after": k.not_after, "activated_at": k.activated_at, "retire_at": k.retire_at, "ski": k.ski}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"keys": v, "bundle_sequence": k.bundle_sequence}))
                .unwrap_or_default()
        );
        return;
    }
    println!(
        "{:<16} {:<9} {:<44} {:<21} RETIRES",
        "KIND", "STATE", "ID", "CREATED"
    );
    for k in &k.keys {
        let retire = if k.retire_at > 0 {
            rfc3339(k.retire_at)
        } else {
            "-".into()
        };
        println!(
            "{:<16} {:<9} {:<44} {:<21} {retire}",
            k.kind,
            k.state,
            k.id,
            rfc3339(k.created_at)
        );
    }
    println!("bundle sequence: {}", k.bundle_sequence);
}

/// `sigil owner ...`.
pub(super) async fn owner(cmd: OwnerCmd) -> Result<()> {
    let (name, active, reason, conn) = match cmd {
        OwnerCmd::List { json, conn } => {
            let r = conn
                .connect()?
                .list_owners(pb::ListOwnersRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            if json {
                let v: Vec<_> = r.owners.iter().map(|o| json!({"name": o.name, "active": o.active, "deactivated_at": o.deactivated_at, "reason": o.reason, "identities": o.identities})).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<32} {:<12} IDENTITIES", "OWNER", "STATUS");
                for o in &r.owners {
                    println!(
                        "{:<32} {:<12} {}",
                        o.name,
                        if o.active { "active" } else { "deactivated" },
                        o.identities.len()
                    );
                }
            }
            return Ok(());
        }
        OwnerCmd::Deactivate { name, reason, conn } => (name, false, reason, conn),
        OwnerCmd::Activate { name, reason, conn } => (name, true, reason, conn),
    };
    let o = conn
        .connect()?
        .set_owner_active(pb::SetOwnerActiveRequest {
            name,
            active,
            reason,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    if active {
        println!(
            "owner {:?} is active again ({} identities)",
            o.name,
            o.identities.len()
        );
    } else {
        println!(
            "owner {:?} deactivated; these identities are flagged in `sigil report` until reassigned or retired:",
            o.name
        );
        for i in &o.identities {
            println!("  {i}");
        }
    }
    Ok(())
}

/// `sigil report`.
pub(super) async fn report(a: ReportArgs) -> Result<()> {
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

/// Prints rows as left-aligned columns sized to their widest cell (the first row is the header).
fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (k, (cell, w)) in row.iter().zip(widths).enumerate() {
            if k + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// `sigil revoke ...`.
pub(super) async fn revoke(cmd: RevokeCmd) -> Result<()> {
    match cmd {
        RevokeCmd::Credential { id, reason, conn } => {
            let mut c = conn.connect()?;
            let r = c
                .revoke_credential(pb::RevokeCredentialRequest {
                    credential_id: id,
                    reason,
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            let cr = r.credential.unwrap_or_default();
            println!(
                "revoked {} {} of {} (it would have expired {})",
                cr.kind,
                cr.credential_id,
                cr.spiffe_id,
                rfc3339(cr.expires_at)
            );
        }
        RevokeCmd::Identity {
            identity,
            reason,
            suspend,
            dry_run,
            json,
            conn,
        } => {
            let mut c = conn.connect()?;
            let r = c
                .revoke_identity(pb::RevokeIdentityRequest {
                    id_or_spiffe_id: identity,
                    reason,
                    suspend,
                    dry_run,
                    retire: false,
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_report(&r, json);
        }
    }
    Ok(())
}

/// `sigil leak`.
pub(super) async fn leak(a: LeakArgs) -> Result<()> {
    let material = zeroize::Zeroizing::new(if a.file == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading the leaked material from standard input")?;
        s
    } else {
        std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file))?
    });
    let mut c = a.conn.connect()?;
    let r = c
        .report_leak(pb::ReportLeakRequest {
            material: material.trim().to_owned(),
            reason: a.reason,
            dry_run: a.dry_run,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    print_report(&r, a.json);
    Ok(())
}

/// `sigil rotate`.
pub(super) async fn rotate(a: RotateArgs) -> Result<()> {
    let mut c = a.conn.connect()?;
    let r = c
        .rotate(pb::RotateRequest {
            kind: a.kind,
            now: a.now,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    print_keys(&r, false);
    Ok(())
}

/// `sigil keys ...`.
pub(super) async fn keys(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::List { json, conn } => {
            let r = conn
                .connect()?
                .list_keys(pb::ListKeysRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_keys(&r, json);
        }
        KeysCmd::Revoke {
            key_id,
            reason,
            conn,
        } => {
            let r = conn
                .connect()?
                .revoke_key(pb::RevokeKeyRequest { key_id, reason })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            print_keys(&r, false);
        }
    }
    Ok(())
}

/// `sigil credential ...`.
pub(super) async fn credential(cmd: CredentialCmd) -> Result<()> {
    match cmd {
        CredentialCmd::Show { id, conn } => {
            let mut c = conn.connect()?;
            let r = c
                .get_credential(pb::GetCredentialRequest { credential_id: id })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            println!("{}", serde_json::to_string_pretty(&credential_json(&r))?);
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

/// `sigil audit ...`.
pub(super) async fn audit(cmd: AuditCmd) -> Result<()> {
    match cmd {
        AuditCmd::Verify {
            offline: true,
            conn,
        } => {
            let dir = conn.data_dir.as_deref().ok_or_else(|| {
                anyhow!(
                    "--offline needs --data-dir (a stopped broker's data dir, or a copy of one)"
                )
            })?;
            let cfg = sigil_broker::config::Config::load(dir)?;
            let sealer =
                sigil_broker::seal::Sealer::new(&sigil_broker::server::load_master_key(&cfg)?);
            let store = cfg.store();
            sigil_broker::store::check_master_key(&store, &sealer)?;
            let entries = sigil_broker::store::read_audit_offline(&store)?;
            match sigil_broker::audit::verify_chain(&sealer, entries) {
                sigil_broker::audit::ChainReport::Intact { entries } => {
                    println!("audit log intact: {entries} entries")
                }
                sigil_broker::audit::ChainReport::Broken { seq, reason } => {
                    bail!("audit log is broken at entry {seq}: {reason}")
                }
            }
        }
        AuditCmd::Verify {
            offline: false,
            conn,
        } => {
            let mut c = conn.connect()?;
            let r = c
                .verify_audit(pb::VerifyAuditRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
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
            conn,
        } => {
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
                println!("{e}");
            }
            let mut next = r.next_sequence;
            if follow {
                loop {
                    tokio::select! {
                        _ = super::shutdown_signal() => break,
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
                        println!("{e}");
                    }
                    next = r.next_sequence;
                }
            }
        }
    }
    Ok(())
}

/// `sigil approve`.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// Identity id or SPIFFE ID.
    pub identity: String,
    /// Approval-gated scope to allow (repeatable).
    #[arg(long = "scope", required = true)]
    pub scopes: Vec<String>,
    /// How long (at most 24h).
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Why (a ticket, an incident); required.
    #[arg(long)]
    pub reason: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sigil approvals ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ApprovalsCmd {
    /// Approvals in force (or all with --all), newest first.
    List {
        /// Only this identity's.
        identity: Option<String>,
        /// Include expired and ended ones.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// End an approval now.
    Revoke {
        /// Approval id (apr-...).
        id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sigil policy ...`.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCmd {
    /// Parse and validate policy files against Sigil's schema, offline.
    Check {
        /// A .cedar file or a directory of them.
        path: PathBuf,
    },
    /// Make the broker re-read its policy files (as SIGHUP does).
    Reload {
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the Cedar schema policies are validated against.
    Schema,
}

/// `sigil operator ...`.
#[derive(Debug, clap::Subcommand)]
pub enum OperatorCmd {
    /// Issue a credential for a new operator: the key is made here and never leaves; the
    /// certificate and key go to --out.
    Create {
        /// Operator name.
        name: String,
        /// admin, operator, auditor or revoker.
        #[arg(long)]
        role: String,
        /// Lifetime.
        #[arg(long = "for", default_value = "30d", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Directory for NAME.crt and NAME.key (0600).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
}

fn approval_json(a: &pb::Approval) -> serde_json::Value {
    json!({"id": a.id, "identity_id": a.identity_id, "spiffe_id": a.spiffe_id,
        "scopes": a.scopes, "created_at": a.created_at, "expires_at": a.expires_at,
        "approved_by": a.approved_by, "reason": a.reason,
        "revoked_at": (a.revoked_at != 0).then_some(a.revoked_at)})
}

/// `sigil approve`.
pub(super) async fn approve(a: ApproveArgs) -> Result<()> {
    let mut c = a.conn.connect()?;
    let r = c
        .approve(pb::ApproveRequest {
            id_or_spiffe_id: a.identity,
            scopes: a.scopes,
            ttl_seconds: u32::try_from(a.duration.as_secs()).unwrap_or(u32::MAX),
            reason: a.reason,
        })
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&approval_json(&r))?);
    } else {
        println!(
            "approved {} for {} until {} ({})",
            r.scopes.join(", "),
            r.spiffe_id,
            rfc3339(r.expires_at),
            r.id
        );
    }
    Ok(())
}

/// `sigil approvals ...`.
pub(super) async fn approvals(cmd: ApprovalsCmd) -> Result<()> {
    match cmd {
        ApprovalsCmd::List {
            identity,
            all,
            json,
            conn,
        } => {
            let mut c = conn.connect()?;
            let r = c
                .list_approvals(pb::ListApprovalsRequest {
                    id_or_spiffe_id: identity.unwrap_or_default(),
                    all,
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            if json {
                let v: Vec<_> = r.approvals.iter().map(approval_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let mut rows = vec![[
                "ID".to_owned(),
                "SPIFFE ID".to_owned(),
                "SCOPES".to_owned(),
                "UNTIL".to_owned(),
                "BY".to_owned(),
                "REASON".to_owned(),
            ]];
            for x in &r.approvals {
                rows.push([
                    x.id.clone(),
                    x.spiffe_id.clone(),
                    x.scopes.join(","),
                    if x.revoked_at != 0 {
                        format!("ended {}", rfc3339(x.revoked_at))
                    } else {
                        rfc3339(x.expires_at)
                    },
                    x.approved_by.clone(),
                    x.reason.clone(),
                ]);
            }
            print_table(&rows);
        }
        ApprovalsCmd::Revoke { id, reason, conn } => {
            let mut c = conn.connect()?;
            let r = c
                .revoke_approval(pb::RevokeApprovalRequest { id, reason })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            println!("ended approval {} for {}", r.id, r.spiffe_id);
        }
    }
    Ok(())
}

/// `sigil policy ...`.
pub(super) async fn policy(cmd: PolicyCmd) -> Result<()> {
    match cmd {
        PolicyCmd::Check { path } => {
            let e = sigil_broker::policy::PolicyEngine::load(
                Some(path),
                sigil_broker::config::PolicyDefault::Permit,
            )
            .map_err(|e| anyhow!("{e}"))?;
            let r = e.report();
            println!(
                "ok: {} policies in {} file(s) validate against the Sigil schema",
                r.policy_ids
                    .iter()
                    .filter(|i| !i.starts_with("sigil."))
                    .count(),
                r.files.len()
            );
            for id in r.policy_ids.iter().filter(|i| !i.starts_with("sigil.")) {
                println!("  {id}");
            }
        }
        PolicyCmd::Reload { conn } => {
            let mut c = conn.connect()?;
            let r = c
                .reload_policy(pb::ReloadPolicyRequest {})
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            println!(
                "reloaded: {} policies from {} file(s)",
                r.policy_ids.len(),
                r.files.len()
            );
        }
        PolicyCmd::Schema => print!("{}", sigil_broker::policy::SCHEMA),
    }
    Ok(())
}

/// `sigil operator ...`.
pub(super) async fn operator_cred(cmd: OperatorCmd) -> Result<()> {
    match cmd {
        OperatorCmd::Create {
            name,
            role,
            duration,
            out,
            conn,
        } => {
            let key = sigil_pki::EcKey::generate()?;
            let csr = sigil_pki::csr::request_for(&key)?;
            let mut c = conn.connect()?;
            let r = c
                .issue_operator_credential(pb::IssueOperatorCredentialRequest {
                    name: name.clone(),
                    role: role.clone(),
                    csr,
                    ttl_seconds: u32::try_from(duration.as_secs()).unwrap_or(u32::MAX),
                })
                .await
                .map_err(sigil_sdk::SdkError::from)?
                .into_inner();
            sigil_broker::fsutil::create_private_dir(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let leaf = r
                .cert_chain
                .first()
                .ok_or_else(|| anyhow!("the broker returned no certificate"))?;
            let cert_path = out.join(format!("{name}.crt"));
            let key_path = out.join(format!("{name}.key"));
            sigil_broker::fsutil::write_atomic(
                &cert_path,
                sigil_pki::certs_to_pem([&sigil_pki::CertificateDer::from(leaf.clone())])
                    .as_bytes(),
                0o644,
            )?;
            sigil_broker::fsutil::write_atomic(
                &key_path,
                key.to_pkcs8_pem()?.expose_secret(),
                0o600,
            )?;
            println!(
                "{role} credential for {name}: {} (expires {})\n  certificate: {}\n  key:         {} (0600)\nUse it with --admin-cert {} --admin-key {}",
                r.spiffe_id,
                rfc3339(r.expires_at),
                cert_path.display(),
                key_path.display(),
                cert_path.display(),
                key_path.display()
            );
        }
    }
    Ok(())
}

/// `sigil whoami`.
pub(super) async fn whoami(conn: Conn) -> Result<()> {
    let mut c = conn.connect()?;
    let r = c
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(sigil_sdk::SdkError::from)?
        .into_inner();
    println!("{} (role {}) {}", r.name, r.role, r.spiffe_id);
    Ok(())
}
