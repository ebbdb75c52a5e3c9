//! Governance on an injected clock: a seeded history yields the expected findings and exact
//! programme metrics; behaviour anomalies are raised and, by policy, suspend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_broker::clock::ManualClock;
use sigil_proto::v1 as pb;
use sigil_sdk::{Evidence, JwtRequest, SvidOptions};
use sigil_tests::{TestBroker, raw};
use tonic::Code;

const DAY: u64 = 86400;

fn id(path: &str) -> String {
    format!("spiffe://example.org/{path}")
}

/// Uses an identity the way a workload would: attest with a fresh join token and take an
/// X.509-SVID and a JWT-SVID for `aud`. (Raw gRPC: the SDK would check certificate times
/// against the real clock, and this test moves the broker's clock by weeks.)
async fn use_identity(b: &TestBroker, spiffe_id: &str, aud: &str) -> pb::AttestResponse {
    let token = b.join_token(spiffe_id).await;
    raw::anon(&b.url, &b.bundle_pem)
        .attest(pb::AttestRequest {
            evidence: Some(pb::Evidence {
                kind: Some(pb::evidence::Kind::JoinToken(pb::JoinTokenEvidence {
                    token,
                })),
            }),
            csr: sigil_pki::csr::request_for(&sigil_pki::EcKey::generate().unwrap()).unwrap(),
            jwts: vec![pb::JwtRequest {
                audiences: vec![aud.into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect("attest")
        .into_inner()
}

async fn report(b: &TestBroker) -> serde_json::Value {
    let r = b
        .admin()
        .report(pb::ReportRequest::default())
        .await
        .unwrap()
        .into_inner();
    serde_json::from_str(&r.json).unwrap()
}

fn findings<'a>(r: &'a serde_json::Value, kind: &str) -> Vec<&'a serde_json::Value> {
    r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_history_yields_the_expected_findings_and_programme_metrics() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let b = TestBroker::start_configured(clock.clone(), |c| {
        c.governance.unused_after = Duration::from_secs(30 * DAY);
        c.governance.expiring_within = Duration::from_secs(14 * DAY);
        c.governance.max_ttl_policy = Duration::from_secs(3600);
    })
    .await;
    let dns_free = |r: &mut pb::CreateIdentityRequest| {
        let e = r.entitlements.as_mut().unwrap();
        e.scopes.clear();
        e.dns_names.clear();
    };
    b.identity("svc/orphan", dns_free).await;
    b.identity("svc/busy", |r| {
        dns_free(r);
        r.entitlements.as_mut().unwrap().audiences = vec!["db".into(), "cache".into()];
    })
    .await;
    b.identity("svc/gone", |r| {
        dns_free(r);
        r.owner = "alice".into();
    })
    .await;
    b.identity("svc/leaky", dns_free).await;
    b.identity("svc/bigttl", |r| {
        dns_free(r);
        r.entitlements.as_mut().unwrap().max_ttl_seconds = 7200;
    })
    .await;
    b.identity("svc/old", dns_free).await;
    use_identity(&b, &id("svc/busy"), "db").await;

    clock.advance(Duration::from_secs(31 * DAY));
    // The rotation schedule runs all along in real life; here the clock jumped a month.
    b.broker().rotation_tick().await.unwrap();
    b.identity("svc/expiring", |r| {
        dns_free(r);
        r.expires_in_seconds = 10 * DAY;
    })
    .await;
    for path in ["svc/busy", "svc/gone", "svc/leaky", "svc/bigttl"] {
        use_identity(&b, &id(path), "db").await;
    }
    let leaky = use_identity(&b, &id("svc/leaky"), "db").await;
    let mut admin = b.admin();
    admin
        .report_leak(pb::ReportLeakRequest {
            material: leaky.jwts[0].token.clone(),
            reason: "pasted in a ticket".into(),
            dry_run: false,
        })
        .await
        .unwrap();
    admin
        .set_owner_active(pb::SetOwnerActiveRequest {
            name: "alice".into(),
            active: false,
            reason: "left the company".into(),
        })
        .await
        .unwrap();
    admin
        .revoke_identity(pb::RevokeIdentityRequest {
            id_or_spiffe_id: id("svc/old"),
            reason: "decommissioned".into(),
            retire: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let outstanding = b.join_token(&id("svc/busy")).await;

    let r = report(&b).await;
    let one = |kind: &str| {
        let f = findings(&r, kind);
        assert_eq!(f.len(), 1, "{kind}: {f:#?}");
        f[0].clone()
    };
    assert_eq!(one("orphan")["spiffe_id"], id("svc/orphan"));
    let unused = one("unused_audience");
    assert_eq!(unused["spiffe_id"], id("svc/busy"));
    assert_eq!(
        unused["recommendation"],
        serde_json::json!({"audiences": ["db"]}),
        "the narrower entitlement to apply"
    );
    assert_eq!(one("expiring")["spiffe_id"], id("svc/expiring"));
    assert_eq!(one("owner_deactivated")["spiffe_id"], id("svc/gone"));
    assert_eq!(one("compromised")["spiffe_id"], id("svc/leaky"));
    assert_eq!(one("ttl_above_policy")["spiffe_id"], id("svc/bigttl"));
    let tok = one("outstanding_join_token");
    assert_eq!(tok["spiffe_id"], id("svc/busy"));
    assert!(
        !serde_json::to_string(&r).unwrap().contains(&outstanding),
        "the report names tokens by fingerprint only"
    );
    assert!(findings(&r, "expired").is_empty());
    assert_eq!(r["findings"][0]["severity"], "high", "most severe first");

    let p = &r["programme"];
    assert_eq!(
        p["identities"], 6,
        "seven created, not counting the retired one"
    );
    assert_eq!(p["retired"], 1);
    assert!(
        (p["ownership_coverage"].as_f64().unwrap() - 5.0 / 6.0).abs() < 1e-9,
        "alice's identity has no active owner"
    );
    assert_eq!(p["orphans"], 1);
    // Credentials issued in the live window: 5 attestations, each a 1h certificate and a 5m token.
    assert_eq!(p["median_credential_lifetime_secs"], 3600);
    assert_eq!(p["incidents"], 1);
    assert!(p["mean_leak_to_revocation_ms"].as_f64().unwrap() > 0.0);

    let busy = r["identities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["spiffe_id"] == id("svc/busy"))
        .unwrap();
    assert_eq!(
        busy["issued"], 4,
        "two attestations, each a certificate and a token"
    );
    assert_eq!(
        busy["granted"]["audiences"],
        serde_json::json!(["cache", "db"])
    );
    assert_eq!(busy["used"]["audiences"], serde_json::json!(["db"]));
    assert!(busy["last_used"].as_i64().unwrap() > 0);

    // Recertifying records who vouched, and the expiring finding goes away.
    let rec = admin
        .recertify(pb::RecertifyRequest {
            id_or_spiffe_id: id("svc/expiring"),
            expires_in_seconds: 90 * DAY,
            reason: "still serving payments".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rec.expires_at > clock_now(&clock) + 80 * DAY as i64);
    assert!(findings(&report(&b).await, "expiring").is_empty());
    let entry = b.audit_for("identity.recertify").await.pop().unwrap();
    assert_eq!(
        (entry["actor"].as_str(), entry["reason"].as_str()),
        (Some("operator:admin"), Some("still serving payments"))
    );
}

fn clock_now(c: &ManualClock) -> i64 {
    use sigil_broker::clock::Clock as _;
    c.unix()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_audience_and_a_rate_spike_raise_anomalies_and_suspend_by_policy() {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let b = TestBroker::start_configured(clock.clone(), |c| {
        c.governance.baseline_min_issued = 5;
        c.governance.baseline_learning = Duration::from_secs(3600);
        c.governance.rate_spike_factor = 5.0;
        c.governance.rate_spike_floor = 20;
    })
    .await;
    for (path, labels) in [
        ("svc/watched", vec![]),
        (
            "svc/strict",
            vec![("on_anomaly".to_owned(), "suspend".to_owned())],
        ),
    ] {
        b.identity(path, |r| {
            let e = r.entitlements.as_mut().unwrap();
            e.audiences = vec!["db".into(), "cache".into()];
            e.max_ttl_seconds = DAY as u32;
            r.labels = labels.into_iter().collect();
        })
        .await;
    }
    // Long-lived SVIDs so the clock can move two hours without them expiring.
    let attest = |path: &'static str| {
        let b = &b;
        async move {
            let w = b.workload();
            w.attest(
                Evidence::JoinToken(b.join_token(&id(path)).await.into()),
                SvidOptions {
                    ttl: Some(Duration::from_secs(DAY)),
                    dns_names: vec![],
                    ..Default::default()
                },
                &[],
            )
            .await
            .unwrap();
            w
        }
    };
    let watched = attest("svc/watched").await;
    let strict = attest("svc/strict").await;
    for w in [&watched, &strict] {
        for _ in 0..5 {
            w.fetch_jwt_svid(&JwtRequest::audience("db")).await.unwrap();
        }
    }
    clock.advance(Duration::from_secs(2 * 3600));

    // A new audience: recorded, and only recorded, under the default policy.
    watched
        .fetch_jwt_svid(&JwtRequest::audience("cache"))
        .await
        .unwrap();
    let a = wait_for_audit(&b, "anomaly.new_audience", 1).await;
    assert!(a[0]["reason"].as_str().unwrap().contains("\"cache\""));
    watched
        .fetch_jwt_svid(&JwtRequest::audience("cache"))
        .await
        .expect("alert only: still minting");

    // A burst far above the usual rate.
    for _ in 0..30 {
        watched
            .fetch_jwt_svid(&JwtRequest::audience("db"))
            .await
            .unwrap();
    }
    let s = wait_for_audit(&b, "anomaly.rate_spike", 1).await;
    assert!(
        s[0]["reason"].as_str().unwrap().contains("usually"),
        "{}",
        s[0]
    );

    // With on_anomaly = suspend the identity is suspended, and the next mint refused at gate 1.
    strict
        .fetch_jwt_svid(&JwtRequest::audience("cache"))
        .await
        .unwrap();
    let mut status = 0;
    for _ in 0..100 {
        status = b
            .admin()
            .get_identity(pb::GetIdentityRequest {
                id_or_spiffe_id: id("svc/strict"),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == pb::IdentityStatus::Suspended as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, pb::IdentityStatus::Suspended as i32);
    let e = strict
        .fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    assert_eq!(e.gate(), Some("gate1.identity_proof"));
    assert!(
        e.message()
            .contains("suspended (anomaly: first credential for audience \"cache\")"),
        "{e}"
    );
    // An operator resumes it.
    b.admin()
        .set_identity_status(pb::SetIdentityStatusRequest {
            id_or_spiffe_id: id("svc/strict"),
            status: pb::IdentityStatus::Active as i32,
            reason: "expected: new cache tier".into(),
        })
        .await
        .unwrap();
    strict
        .fetch_jwt_svid(&JwtRequest::audience("cache"))
        .await
        .expect("resumed");
    let r = report(&b).await;
    assert!(
        findings(&r, "anomaly").len() >= 3,
        "anomalies appear in the report"
    );
}

async fn wait_for_audit(b: &TestBroker, action: &str, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..100 {
        let found = b.audit_for(action).await;
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no {action} audit entry");
}

/// Live means issued, unexpired, not revoked and of the identity's current generation — in the
/// report, the metrics and the credential's own view; revoking twice changes nothing and says
/// when it was revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_counts_leave_out_revoked_credentials_and_older_generations() {
    use sigil_proto::v1 as pb;
    let b = sigil_tests::TestBroker::start().await;
    b.identity("svc/live", |_| {}).await;
    b.identity("svc/other", |_| {}).await;
    let id = "spiffe://example.org/svc/live";
    let (w, _) = b.attested(id, &[]).await;
    let mut jtis = Vec::new();
    for _ in 0..5 {
        jtis.push(
            w.fetch_jwt_svid(&sigil_sdk::JwtRequest::audience("db"))
                .await
                .unwrap()
                .jti,
        );
    }
    let live_in_report = |json: &str, spiffe: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["identities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["spiffe_id"] == spiffe)
            .map(|i| i["live_credentials"].as_u64().unwrap())
            .unwrap_or(0)
    };
    let report = |b: &sigil_tests::TestBroker| {
        let mut a = b.admin();
        async move {
            a.report(pb::ReportRequest::default())
                .await
                .unwrap()
                .into_inner()
                .json
        }
    };
    let metric = |text: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with("sigil_live_credentials "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    // 1 certificate + 5 tokens.
    assert_eq!(live_in_report(&report(&b).await, id), 6);
    let before = metric(&b.http_get("/metrics").await.1);

    // Two tokens revoked one by one; the second revocation of the same one changes nothing.
    let mut adm = b.admin();
    for j in &jtis[..2] {
        let r = adm
            .revoke_credential(pb::RevokeCredentialRequest {
                credential_id: j.clone(),
                reason: "leaked in a log".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.already_revoked);
    }
    let again = adm
        .revoke_credential(pb::RevokeCredentialRequest {
            credential_id: jtis[0].clone(),
            reason: "again".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        again.already_revoked,
        "revoking twice says it was revoked before"
    );
    let rev = again.credential.unwrap().revocation.unwrap();
    assert_eq!(
        (rev.how.as_str(), rev.reason.as_str()),
        ("credential", "leaked in a log"),
        "and when, by whom, why: the first revocation"
    );
    assert!(rev.revoked_at > 0 && rev.revoked_by.contains("admin"));
    let shown = adm
        .get_credential(pb::GetCredentialRequest {
            credential_id: jtis[1].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.revocation.unwrap().how, "credential");
    assert_eq!(live_in_report(&report(&b).await, id), 4);
    assert_eq!(metric(&b.http_get("/metrics").await.1), before - 2.0);

    // Everything the identity holds revoked (a generation bump): nothing of it is live.
    adm.revoke_identity(pb::RevokeIdentityRequest {
        id_or_spiffe_id: id.into(),
        reason: "rotate everything".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(live_in_report(&report(&b).await, id), 0);
    let shown = adm
        .get_credential(pb::GetCredentialRequest {
            credential_id: jtis[4].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        shown.revocation.is_some(),
        "a credential of the old generation shows as revoked"
    );
    assert_eq!(metric(&b.http_get("/metrics").await.1), before - 6.0);
}
