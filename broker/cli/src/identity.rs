//! `sigil identity ...`: register, list, show, update, suspend, resume, retire and recertify
//! identities.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use sigil_broker::clock::rfc3339;
use sigil_proto::v1 as pb;

use crate::Conn;
use crate::output::{identity_json, print_report, status_name, ttl32};

/// `sigil identity ...`.
#[derive(Debug, Subcommand)]
pub enum IdentityCmd {
    /// Register an identity.
    Create(CreateArgs),
    /// List identities.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one identity (by id or SPIFFE ID).
    Show {
        /// Identity id or SPIFFE ID.
        identity: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Change an identity's owner, purpose, labels, selectors, entitlements or lifetime.
    Update(UpdateArgs),
    /// Refuse all minting for an identity until resumed.
    Suspend(StatusArgs),
    /// Resume a suspended identity.
    Resume(StatusArgs),
    /// Retire an identity for good (revokes everything it holds).
    Retire(RetireArgs),
    /// Extend an identity's life, vouching that it is still needed.
    Recertify {
        /// Identity id or SPIFFE ID.
        identity: String,
        /// New lifetime from now (default: the broker's identity lifetime, 90d).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        lifetime: Option<Duration>,
        /// Why it is still needed (recorded with who vouched).
        #[arg(long, default_value = "")]
        reason: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

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

/// `sigil identity ...`.
pub(crate) async fn run(cmd: IdentityCmd) -> Result<()> {
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

fn list_or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}
