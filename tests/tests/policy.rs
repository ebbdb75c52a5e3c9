//! Gate 3 (Cedar request policy), just-in-time approvals, admin roles and delegated tokens,
//! end to end against a real broker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use clap::Parser as _;
use serde_json::{Value, json};
use sigil_broker::clock::{Clock, ManualClock, SystemClock};
use sigil_proto::v1 as pb;
use sigil_sdk::JwtRequest;
use sigil_tests::TestBroker;
use tonic::Code;

const API: &str = "spiffe://example.org/payments/api";

fn claims(token: &str) -> Value {
    let p = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p)
            .unwrap(),
    )
    .unwrap()
}

async fn broker_with_policies(
    clock: Arc<dyn Clock>,
    files: &[(&str, &str)],
) -> (TestBroker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let p = dir.path().to_owned();
    let b = TestBroker::start_configured(clock, move |c| c.policy.path = Some(p)).await;
    (b, dir)
}

const NO_PROD_DB: &str = r#"
@id("prod-db-needs-unix")
@reason("tokens for prod-db are only for workloads attested on the Unix socket")
forbid(principal, action == Sigil::Action::"mint_jwt", resource == Sigil::Audience::"prod-db")
unless { context.method == "unix" };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cedar_forbid_blocks_what_gate_2_allows_and_a_bad_reload_keeps_it() {
    let (b, dir) = broker_with_policies(Arc::new(SystemClock), &[("prod.cedar", NO_PROD_DB)]).await;
    b.identity("payments/api", |r| {
        r.entitlements.as_mut().unwrap().audiences = vec!["db".into(), "prod-db".into()];
    })
    .await;
    let (w, _) = b.attested(API, &[]).await;
    w.fetch_jwt_svid(&JwtRequest::audience("db")).await.unwrap();
    let e = w
        .fetch_jwt_svid(&JwtRequest::audience("prod-db"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    assert_eq!(e.gate(), Some("gate3.request_policy"));
    assert!(
        e.message()
            .contains("policy prod-db-needs-unix forbids mint_jwt")
            && e.message()
                .contains("only for workloads attested on the Unix socket"),
        "{e}"
    );
    // The audit entry names the rule; allowed mints name the policy that permitted them.
    let mints = b.audit_for("jwt.mint").await;
    let denied = mints.iter().find(|m| m["decision"] == "deny").unwrap();
    assert_eq!(denied["gate"], "gate3.request_policy");
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("prod-db-needs-unix")
    );
    let allowed = mints.iter().find(|m| m["decision"] == "allow").unwrap();
    assert!(
        allowed["detail"]["gates"]
            .as_array()
            .unwrap()
            .contains(&json!(
                "gate3.request_policy: allow (permitted by sigil.default)"
            )),
        "{allowed}"
    );

    // A malformed file: the reload is refused with file and line; the old policy stays.
    std::fs::write(
        dir.path().join("broken.cedar"),
        "// an operator's typo\npermit(principal, action, resource) when { principal.nosuch };\n",
    )
    .unwrap();
    let mut admin = b.admin();
    let e = admin
        .reload_policy(pb::ReloadPolicyRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("broken.cedar:2:"), "{}", e.message());
    assert!(e.message().contains("the policies in force stay"));
    let e = w
        .fetch_jwt_svid(&JwtRequest::audience("prod-db"))
        .await
        .unwrap_err();
    assert_eq!(e.gate(), Some("gate3.request_policy"), "still forbidden");
    let reloads = b.audit_for("policy.reload").await;
    assert_eq!(reloads.last().unwrap()["decision"], "deny");

    // Fixed, and the forbid removed: the reload takes effect.
    std::fs::remove_file(dir.path().join("broken.cedar")).unwrap();
    std::fs::write(dir.path().join("prod.cedar"), "// prod-db is open again\n").unwrap();
    let r = admin
        .reload_policy(pb::ReloadPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.policy_ids.iter().all(|i| i.starts_with("sigil.")),
        "{r:?}"
    );
    w.fetch_jwt_svid(&JwtRequest::audience("prod-db"))
        .await
        .expect("permitted after the reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_gated_scope_is_minted_only_while_an_approval_is_in_force() {
    // Behind real time, so the clock can advance while certificates stay valid for rustls.
    let clock = Arc::new(ManualClock::new(
        SystemTime::now() - Duration::from_secs(20 * 60),
    ));
    let b = TestBroker::start_with_clock(clock.clone()).await;
    b.identity("payments/api", |r| {
        let e = r.entitlements.as_mut().unwrap();
        e.scopes = vec!["read".into(), "refund".into()];
        e.approval_scopes = vec!["refund".into()];
    })
    .await;
    let (w, _) = b.attested(API, &[]).await;
    let refund = JwtRequest {
        audiences: vec!["db".into()],
        scopes: vec!["refund".into()],
        ttl: Some(Duration::from_secs(3600)),
    };
    let e = w.fetch_jwt_svid(&refund).await.unwrap_err();
    assert_eq!(e.gate(), Some("gate3.request_policy"));
    assert!(
        e.message().contains("scope \"refund\" needs an approval"),
        "{e}"
    );
    // Other scopes are unaffected.
    w.fetch_jwt_svid(&JwtRequest {
        audiences: vec!["db".into()],
        scopes: vec!["read".into()],
        ttl: None,
    })
    .await
    .unwrap();

    let mut admin = b.admin();
    let e = admin
        .approve(pb::ApproveRequest {
            id_or_spiffe_id: API.into(),
            scopes: vec!["read".into()],
            ttl_seconds: 900,
            reason: "INC-42".into(),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("not one of"), "{}", e.message());
    let approval = admin
        .approve(pb::ApproveRequest {
            id_or_spiffe_id: API.into(),
            scopes: vec!["refund".into()],
            ttl_seconds: 900,
            reason: "INC-42 refund batch".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let t = w.fetch_jwt_svid(&refund).await.unwrap();
    assert_eq!(t.scopes, vec!["refund".to_string()]);
    // Never beyond the approval.
    assert!(t.expires_at <= approval.expires_at, "{t:?} {approval:?}");
    assert!(t.grant.ttl_clamped || t.grant.notice.contains("approval"));

    clock.advance(Duration::from_secs(901));
    let e = w.fetch_jwt_svid(&refund).await.unwrap_err();
    assert!(e.message().contains("needs an approval"), "{e}");
    b.broker().record_expired_approvals().await.unwrap();
    let audit: Vec<String> = b
        .audit()
        .await
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("approval."))
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(audit, ["approval.grant", "approval.expire"]);
    let listed = admin
        .list_approvals(pb::ListApprovalsRequest {
            id_or_spiffe_id: API.into(),
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.approvals.is_empty(),
        "expired approvals are not in force"
    );
}

async fn operator_credential(b: &TestBroker, name: &str, role: &str, out: &Path) {
    let cli = sigil_cli::Cli::parse_from([
        "sigil",
        "operator",
        "create",
        name,
        "--role",
        role,
        "--out",
        out.to_str().unwrap(),
        "--data-dir",
        b.data.to_str().unwrap(),
    ]);
    sigil_cli::run(cli).await.unwrap();
}

fn admin_as(
    b: &TestBroker,
    name: &str,
    dir: &Path,
) -> pb::admin_client::AdminClient<sigil_sdk::Failover> {
    let cert = std::fs::read(dir.join(format!("{name}.crt"))).unwrap();
    let key = std::fs::read(dir.join(format!("{name}.key"))).unwrap();
    sigil_sdk::connect_admin(&b.url, &b.bundle_pem, &cert, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_cannot_revoke_and_a_revoker_cannot_create_identities() {
    let b = TestBroker::start().await;
    b.identity("payments/api", |_| {}).await;
    let (_, creds) = b.attested(API, &[]).await;
    let creds_dir = tempfile::tempdir().unwrap();
    operator_credential(&b, "ana", "auditor", creds_dir.path()).await;
    operator_credential(&b, "rob", "revoker", creds_dir.path()).await;
    let mode = std::fs::metadata(creds_dir.path().join("ana.key"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let mut ana = admin_as(&b, "ana", creds_dir.path());
    let me = ana
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((me.name.as_str(), me.role.as_str()), ("ana", "auditor"));
    // An auditor reads...
    assert_eq!(
        ana.list_identities(pb::ListIdentitiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .identities
            .len(),
        1
    );
    ana.list_audit(pb::ListAuditRequest {
        from_sequence: 1,
        limit: 10,
        ..Default::default()
    })
    .await
    .unwrap();
    // ...but cannot revoke, approve or mint operators.
    let e = ana
        .revoke_credential(pb::RevokeCredentialRequest {
            credential_id: creds.svid.serial.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("operator ana (role auditor) may not credential.revoke"),
        "{}",
        e.message()
    );
    assert!(
        ana.create_join_token(pb::CreateJoinTokenRequest {
            id_or_spiffe_id: API.into(),
            ttl_seconds: 0,
        })
        .await
        .is_err()
    );

    let mut rob = admin_as(&b, "rob", creds_dir.path());
    let e = rob
        .create_identity(pb::CreateIdentityRequest {
            spiffe_id: "spiffe://example.org/rogue".into(),
            owner: "rob".into(),
            purpose: "should not exist".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("operator rob (role revoker) may not identity.create"),
        "{}",
        e.message()
    );
    // A revoker revokes.
    rob.revoke_credential(pb::RevokeCredentialRequest {
        credential_id: creds.svid.serial.clone(),
        reason: "leaked in CI logs".into(),
    })
    .await
    .unwrap();
    assert!(b.broker().is_revoked(
        sigil_broker::model::CredentialKind::X509,
        &creds.svid.serial
    ));
    let e = rob
        .issue_operator_credential(pb::IssueOperatorCredentialRequest {
            name: "mallory".into(),
            role: "admin".into(),
            csr: sigil_pki::csr::request_for(&sigil_pki::EcKey::generate().unwrap()).unwrap(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "no escalation");

    // Each refusal is audited with the role; nothing was created.
    let denied: Vec<(String, String)> = b
        .audit()
        .await
        .iter()
        .filter(|e| e["decision"] == "deny" && e["action"].as_str().unwrap().starts_with("admin."))
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        denied,
        [
            ("admin.credential.revoke".into(), "operator:ana".into()),
            ("admin.join_token.create".into(), "operator:ana".into()),
            ("admin.identity.create".into(), "operator:rob".into()),
            ("admin.operator.issue".into(), "operator:rob".into()),
        ]
    );
    assert!(
        b.broker()
            .registry()
            .by_spiffe_id("spiffe://example.org/rogue")
            .is_none()
    );
}

const AGENTS: &str = r#"
@id("agents-act-for-payments")
permit(principal, action == Sigil::Action::"exchange", resource)
when {
  principal.path like "/agents/*" &&
  context.subject == "spiffe://example.org/payments/api" &&
  context.depth <= 2
};
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchanged_token_is_narrower_names_its_actors_and_dies_with_its_subject() {
    let (b, dir) = broker_with_policies(Arc::new(SystemClock), &[]).await;
    b.identity("payments/api", |r| {
        let e = r.entitlements.as_mut().unwrap();
        e.audiences = vec!["db".into(), "ledger".into()];
        e.scopes = vec!["read".into(), "write".into()];
    })
    .await;
    for agent in ["agents/summarizer", "agents/planner"] {
        b.identity(agent, |_| {}).await;
    }
    let (api, _) = b.attested(API, &[]).await;
    let parent = api
        .fetch_jwt_svid(&JwtRequest {
            audiences: vec!["db".into(), "ledger".into()],
            scopes: vec!["read".into(), "write".into()],
            ttl: Some(Duration::from_secs(600)),
        })
        .await
        .unwrap();
    let (summarizer, _) = b
        .attested("spiffe://example.org/agents/summarizer", &[])
        .await;
    let (planner, _) = b.attested("spiffe://example.org/agents/planner", &[]).await;
    let narrow = JwtRequest {
        audiences: vec!["db".into()],
        scopes: vec!["read".into()],
        ttl: Some(Duration::from_secs(3600)),
    };

    // No policy permits exchange by default.
    let e = summarizer
        .exchange_jwt_svid(parent.token.expose_secret(), &narrow)
        .await
        .unwrap_err();
    assert_eq!(e.gate(), Some("gate3.request_policy"));
    assert!(e.message().contains("no policy permits"), "{e}");

    std::fs::write(dir.path().join("agents.cedar"), AGENTS).unwrap();
    b.admin()
        .reload_policy(pb::ReloadPolicyRequest {})
        .await
        .unwrap();
    let (child, actors) = summarizer
        .exchange_jwt_svid(parent.token.expose_secret(), &narrow)
        .await
        .unwrap();
    assert_eq!(actors, ["spiffe://example.org/agents/summarizer"]);
    let c = claims(child.token.expose_secret());
    assert_eq!(c["sub"], API, "still the workload's token");
    assert_eq!(c["aud"], "db");
    assert_eq!(c["scope"], "read");
    assert_eq!(
        c["act"],
        json!({"sub": "spiffe://example.org/agents/summarizer"})
    );
    assert!(
        child.expires_at <= parent.expires_at,
        "never outlives its parent"
    );
    assert!(child.grant.ttl_clamped);

    // Never more than the parent had.
    for (ask, field) in [
        (
            JwtRequest {
                audiences: vec!["cache".into()],
                ..Default::default()
            },
            "audience \"cache\"",
        ),
        (
            JwtRequest {
                audiences: vec!["db".into()],
                scopes: vec!["admin".into()],
                ttl: None,
            },
            "scope \"admin\"",
        ),
    ] {
        let e = summarizer
            .exchange_jwt_svid(parent.token.expose_secret(), &ask)
            .await
            .unwrap_err();
        assert_eq!(e.gate(), Some("gate2.entitlement_scope"));
        assert!(
            e.message().contains(field) && e.message().contains("only narrows"),
            "{e}"
        );
    }

    // A second hop nests the chain; a third is beyond the policy's depth.
    let (grandchild, actors) = planner
        .exchange_jwt_svid(child.token.expose_secret(), &JwtRequest::audience("db"))
        .await
        .unwrap();
    assert_eq!(
        actors,
        [
            "spiffe://example.org/agents/planner",
            "spiffe://example.org/agents/summarizer"
        ]
    );
    assert_eq!(
        claims(grandchild.token.expose_secret())["act"],
        json!({"sub": "spiffe://example.org/agents/planner",
               "act": {"sub": "spiffe://example.org/agents/summarizer"}})
    );
    assert!(
        claims(grandchild.token.expose_secret())
            .get("scope")
            .is_none()
    );
    let e = summarizer
        .exchange_jwt_svid(
            grandchild.token.expose_secret(),
            &JwtRequest::audience("db"),
        )
        .await
        .unwrap_err();
    assert_eq!(e.gate(), Some("gate3.request_policy"), "{e}");

    // Revoking the workload's identity kills every token derived from its credentials.
    let active = |t: &str| {
        let t = t.to_owned();
        let p = planner.clone();
        async move { p.introspect_token(&t).await.unwrap().active }
    };
    assert!(active(child.token.expose_secret()).await);
    b.admin()
        .revoke_identity(pb::RevokeIdentityRequest {
            id_or_spiffe_id: API.into(),
            reason: "agent misuse".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!active(child.token.expose_secret()).await);
    assert!(!active(grandchild.token.expose_secret()).await);
    let e = summarizer
        .exchange_jwt_svid(parent.token.expose_secret(), &narrow)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));

    // Audited with the chain.
    let ex = b.audit_for("jwt.exchange").await;
    let ok: Vec<&Value> = ex.iter().filter(|e| e["decision"] == "allow").collect();
    assert_eq!(ok.len(), 2);
    assert_eq!(
        ok[1]["detail"]["actors"],
        json!([
            "spiffe://example.org/agents/planner",
            "spiffe://example.org/agents/summarizer"
        ])
    );
    assert_eq!(ok[0]["detail"]["parent_jti"], parent.jti);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_disables_every_token_exchanged_from_it_and_nothing_else() {
    let (b, _dir) = broker_with_policies(Arc::new(SystemClock), &[("agents.cedar", AGENTS)]).await;
    b.identity("payments/api", |r| {
        r.entitlements.as_mut().unwrap().audiences = vec!["db".into()];
    })
    .await;
    for agent in ["agents/summarizer", "agents/planner", "agents/verifier"] {
        b.identity(agent, |_| {}).await;
    }
    let (api, _) = b.attested(API, &[]).await;
    let (summarizer, _) = b
        .attested("spiffe://example.org/agents/summarizer", &[])
        .await;
    let (planner, _) = b.attested("spiffe://example.org/agents/planner", &[]).await;
    let db = JwtRequest::audience("db");
    let leaked = api.fetch_jwt_svid(&db).await.unwrap();
    let kept = api.fetch_jwt_svid(&db).await.unwrap();
    let (child, _) = summarizer
        .exchange_jwt_svid(leaked.token.expose_secret(), &db)
        .await
        .unwrap();
    let (grandchild, _) = planner
        .exchange_jwt_svid(child.token.expose_secret(), &db)
        .await
        .unwrap();
    let (sibling, _) = summarizer
        .exchange_jwt_svid(kept.token.expose_secret(), &db)
        .await
        .unwrap();
    assert_eq!(
        claims(grandchild.token.expose_secret())["sigil_parents"],
        json!([child.jti, leaked.jti]),
        "a token names the tokens it came from, nearest first"
    );

    // A resource server's offline verifier, following the broker's watch stream.
    let token_file = _dir.path().join("verifier-token");
    std::fs::write(
        &token_file,
        b.join_token("spiffe://example.org/agents/verifier").await,
    )
    .unwrap();
    let source = sigil_sdk::Source::start(
        b.workload(),
        Arc::new(sigil_sdk::JoinTokenFile::new(&token_file)),
        sigil_sdk::SourceConfig::default(),
    )
    .await
    .unwrap();
    let verifier = source.verifier();
    for t in [&leaked, &kept, &child, &grandchild, &sibling] {
        verifier.verify_jwt(t.token.expose_secret(), "db").unwrap();
    }

    b.admin()
        .revoke_credential(pb::RevokeCredentialRequest {
            credential_id: leaked.jti.clone(),
            reason: "pasted into a chat".into(),
        })
        .await
        .unwrap();

    // The broker's introspection (and the Workload API's ValidateJWTSVID behind it).
    for (t, why) in [
        (&leaked, "revoked".to_owned()),
        (
            &child,
            format!("exchanged from token {}, which was revoked", leaked.jti),
        ),
        (
            &grandchild,
            format!("exchanged from token {}, which was revoked", leaked.jti),
        ),
    ] {
        // A workload hears only "inactive" (RFC 7662); the broker knows why.
        let i = planner
            .introspect_token(t.token.expose_secret())
            .await
            .unwrap();
        assert!(!i.active, "{}", t.jti);
        let i = b.broker().introspect_token(t.token.expose_secret());
        assert_eq!((i.active, i.reason), (false, why));
    }
    for t in [&kept, &sibling] {
        assert!(
            planner
                .introspect_token(t.token.expose_secret())
                .await
                .unwrap()
                .active,
            "another lineage of the same workload is untouched"
        );
    }
    // Nothing more can be derived from the dead lineage.
    let e = planner
        .exchange_jwt_svid(child.token.expose_secret(), &db)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert!(
        e.message().contains("subject_token")
            && e.message()
                .contains(&format!("exchanged from token {}", leaked.jti)),
        "{e}"
    );

    // Offline verifiers hear the revocation and refuse the descendants too.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while verifier
        .verify_jwt(grandchild.token.expose_secret(), "db")
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the verifier never heard of the revocation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in [&child, &grandchild] {
        assert_eq!(
            verifier.verify_jwt(t.token.expose_secret(), "db"),
            Err(sigil_sdk::VerifyError::ParentRevoked(leaked.jti.clone()))
        );
    }
    for t in [&kept, &sibling] {
        verifier.verify_jwt(t.token.expose_secret(), "db").unwrap();
    }
    source.shutdown().await;
}

/// `exchange.max_depth` holds on its own: with a policy that permits exchange at any depth,
/// the hop that would make the actor chain longer than the limit is refused, naming the
/// setting, and nothing is minted for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_actor_chain_never_grows_past_exchange_max_depth_whatever_the_policy_says() {
    const ANY_DEPTH: &str = r#"
@id("agents-act-at-any-depth")
permit(principal, action == Sigil::Action::"exchange", resource)
when { principal.path like "/agents/*" };
"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("any.cedar"), ANY_DEPTH).unwrap();
    let p = dir.path().to_owned();
    let b = TestBroker::start_configured(Arc::new(SystemClock), move |c| {
        c.policy.path = Some(p);
        c.exchange.max_depth = 2;
    })
    .await;
    b.identity("payments/api", |_| {}).await;
    let mut agents = Vec::new();
    for name in ["a", "b", "c"] {
        b.identity(&format!("agents/{name}"), |_| {}).await;
        agents.push(
            b.attested(&format!("spiffe://example.org/agents/{name}"), &[])
                .await
                .0,
        );
    }
    let (api, _) = b.attested(API, &[]).await;
    let parent = api
        .fetch_jwt_svid(&JwtRequest::audience("db"))
        .await
        .unwrap();
    let (one, actors) = agents[0]
        .exchange_jwt_svid(parent.token.expose_secret(), &JwtRequest::audience("db"))
        .await
        .unwrap();
    assert_eq!(actors.len(), 1);
    let (two, actors) = agents[1]
        .exchange_jwt_svid(one.token.expose_secret(), &JwtRequest::audience("db"))
        .await
        .expect("a chain of two is within max_depth = 2");
    assert_eq!(actors.len(), 2);
    let allowed_before = b
        .audit_for("jwt.exchange")
        .await
        .iter()
        .filter(|e| e["decision"] == "allow")
        .count();
    let e = agents[2]
        .exchange_jwt_svid(two.token.expose_secret(), &JwtRequest::audience("db"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(
        e.message().contains("exchange.max_depth = 2") && e.message().contains("would be 3"),
        "{e}"
    );
    let ex = b.audit_for("jwt.exchange").await;
    assert_eq!(
        ex.iter().filter(|e| e["decision"] == "allow").count(),
        allowed_before,
        "nothing minted for the refused hop"
    );
    assert!(
        ex.iter()
            .any(|e| e["decision"] == "deny"
                && e["reason"].as_str().unwrap_or("").contains("max_depth")),
        "the refusal is audited: {ex:#?}"
    );
}
