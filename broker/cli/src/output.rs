//! What several command groups print the same way: identities, credentials and revocation
//! reports (as text or JSON), status names, aligned tables; and `ttl32`, the lifetime flags'
//! wire form.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use sigil_broker::clock::rfc3339;
use sigil_proto::v1 as pb;

/// The name an identity status is shown by.
pub(crate) fn status_name(s: i32) -> &'static str {
    match pb::IdentityStatus::try_from(s) {
        Ok(pb::IdentityStatus::Active) => "active",
        Ok(pb::IdentityStatus::Suspended) => "suspended",
        Ok(pb::IdentityStatus::Compromised) => "compromised",
        Ok(pb::IdentityStatus::Retired) => "retired",
        _ => "unknown",
    }
}

/// The JSON form of an identity.
pub(crate) fn identity_json(i: &pb::Identity) -> serde_json::Value {
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

/// The JSON form of a ledger record.
pub(crate) fn credential_json(r: &pb::Credential) -> serde_json::Value {
    json!({
        "credential_id": r.credential_id, "kind": r.kind, "identity_id": r.identity_id, "spiffe_id": r.spiffe_id,
        "generation": r.generation, "audiences": r.audiences, "scopes": r.scopes, "dns_names": r.dns_names,
        "issued_at": rfc3339(r.issued_at), "expires_at": rfc3339(r.expires_at), "signing_key_id": r.signing_key_id,
        "attestation": r.attestation,
        "revoked": r.revocation.as_ref().map(|v| json!({
            "how": v.how,
            "at": (v.revoked_at > 0).then(|| rfc3339(v.revoked_at)),
            "reason": v.reason,
            "by": v.revoked_by,
        })),
    })
}

/// How a revoked credential was revoked, in one line.
pub(crate) fn revocation_line(v: &pb::CredentialRevocation) -> String {
    let mut s = String::from("REVOKED");
    if v.revoked_at > 0 {
        s.push_str(&format!(" at {}", rfc3339(v.revoked_at)));
    }
    if !v.revoked_by.is_empty() {
        s.push_str(&format!(" by {}", v.revoked_by));
    }
    s.push_str(&format!(": {}", v.reason));
    s
}

/// A credential for people: one field per line.
pub(crate) fn print_credential(r: &pb::Credential, now: i64) {
    let status = match &r.revocation {
        Some(v) => revocation_line(v),
        None if r.expires_at <= now => format!("expired at {}", rfc3339(r.expires_at)),
        None => "live".into(),
    };
    println!("credential   {} ({})", r.credential_id, r.kind);
    println!(
        "identity     {} ({}), generation {}",
        r.spiffe_id, r.identity_id, r.generation
    );
    println!("status       {status}");
    println!("issued       {}", rfc3339(r.issued_at));
    println!("expires      {}", rfc3339(r.expires_at));
    if !r.audiences.is_empty() {
        println!("audiences    {}", r.audiences.join(", "));
    }
    if !r.scopes.is_empty() {
        println!("scopes       {}", r.scopes.join(", "));
    }
    if !r.dns_names.is_empty() {
        println!("dns names    {}", r.dns_names.join(", "));
    }
    println!("signed by    {}", r.signing_key_id);
    println!("attested by  {}", r.attestation);
}

/// Prints a revocation report (`revoke identity`, `identity retire`, `leak`): the identity, the
/// blast radius, the audit entry.
pub(crate) fn print_report(r: &pb::RevocationReport, as_json: bool) {
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

/// Prints rows as left-aligned columns sized to their widest cell (the first row is the header).
pub(crate) fn print_table<const N: usize>(rows: &[[String; N]]) {
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

/// A lifetime flag as the API's `u32` seconds (saturating; absent is 0).
pub(crate) fn ttl32(d: Option<Duration>) -> u32 {
    d.map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// For an irreversible command: proceeds with `--yes`; on a terminal, asks for `expected` to
/// be typed back; otherwise (a script without --yes) refuses, saying how to proceed.
pub(crate) fn confirm(yes: bool, what: &str, expected: &str) -> anyhow::Result<()> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "{what} cannot be undone: pass --yes to do it (or --dry-run to see what it would do)"
        );
    }
    eprint!("{what} cannot be undone. Type {expected:?} to go on: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != expected {
        anyhow::bail!("not confirmed; nothing was changed");
    }
    Ok(())
}
