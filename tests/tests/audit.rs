//! The audit trail: tamper detection on a copy of the store, filtered export.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Parser as _;
use sigil_broker::store::StoreConfig;
use sigil_broker::store::testing::edit_audit;
use sigil_proto::v1 as pb;
use sigil_tests::TestBroker;

/// A copy of a stopped broker's data dir, with its master key in a 0600 file so `sigil audit
/// verify --offline` can read it.
fn copy_data_dir(b: &TestBroker, name: &str) -> PathBuf {
    let dst = b.dir.path().join(name);
    std::fs::create_dir_all(dst.join("admin")).unwrap();
    let files = StoreConfig::in_data_dir(&b.data).files();
    for f in files.iter().map(|p| p.file_name().unwrap()) {
        std::fs::copy(b.data.join(f), dst.join(f)).unwrap();
    }
    for f in ["sigil.toml", "bundle.pem"] {
        std::fs::copy(b.data.join(f), dst.join(f)).unwrap();
    }
    b.master.write_new_file(&dst.join("master.key")).unwrap();
    dst
}

/// Edits the audit entries of a stopped store as someone with write access to its files (but
/// not the master key) could.
fn tamper(dir: &Path, f: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>)) {
    edit_audit(&StoreConfig::in_data_dir(dir), f).unwrap();
}

fn get(t: &BTreeMap<u64, Vec<u8>>, seq: u64) -> Vec<u8> {
    t[&seq].clone()
}

async fn verify_offline(dir: &Path) -> Result<(), String> {
    let cli = sigil_cli::Cli::parse_from([
        "sigil",
        "audit",
        "verify",
        "--offline",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    sigil_cli::run(cli).await.map_err(|e| format!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_first_edited_removed_or_reordered_entry() {
    let mut b = TestBroker::start().await;
    b.identity("svc/a", |_| {}).await;
    for _ in 0..3 {
        b.attested("spiffe://example.org/svc/a", &["db"]).await;
    }
    let n = b.audit().await.len() as u64;
    assert!(n >= 12, "{n} entries");
    b.stop().await;

    let intact = copy_data_dir(&b, "intact");
    verify_offline(&intact)
        .await
        .expect("an untouched store verifies");

    let edited = copy_data_dir(&b, "edited");
    tamper(&edited, |t| {
        let e = String::from_utf8(get(t, 7))
            .unwrap()
            .replace("\"decision\":\"allow\"", "\"decision\":\"deny\"");
        t.insert(7, e.into_bytes());
    });
    let e = verify_offline(&edited).await.unwrap_err();
    assert!(
        e.contains("broken at entry 7") && e.contains("edited"),
        "{e}"
    );

    let removed = copy_data_dir(&b, "removed");
    tamper(&removed, |t| {
        t.remove(&5);
    });
    let e = verify_offline(&removed).await.unwrap_err();
    assert!(
        e.contains("broken at entry 5") && e.contains("missing"),
        "{e}"
    );

    let reordered = copy_data_dir(&b, "reordered");
    tamper(&reordered, |t| {
        let (a, c) = (get(t, 3), get(t, 9));
        t.insert(3, c);
        t.insert(9, a);
    });
    let e = verify_offline(&reordered).await.unwrap_err();
    assert!(
        e.contains("broken at entry 3") && e.contains("reordered"),
        "{e}"
    );

    // Cutting off the tail and re-chaining is not possible without the key: rewriting the last
    // entry's hash from a copy of another entry breaks it too.
    let forged = copy_data_dir(&b, "forged");
    tamper(&forged, |t| {
        let mut e: serde_json::Value = serde_json::from_slice(&get(t, n)).unwrap();
        e["reason"] = "nothing to see".into();
        e["hash"] =
            serde_json::from_slice::<serde_json::Value>(&get(t, n - 1)).unwrap()["hash"].clone();
        t.insert(n, serde_json::to_vec(&e).unwrap());
    });
    let e = verify_offline(&forged).await.unwrap_err();
    assert!(e.contains(&format!("broken at entry {n}")), "{e}");

    // A wrong master key is named as such, not as tampering.
    let wrong = copy_data_dir(&b, "wrongkey");
    std::fs::remove_file(wrong.join("master.key")).unwrap();
    sigil_broker::seal::MasterKey::generate()
        .write_new_file(&wrong.join("master.key"))
        .unwrap();
    let e = verify_offline(&wrong).await.unwrap_err();
    assert!(e.contains("master key does not match"), "{e}");

    // The running broker verifies its own chain too.
    b.restart().await;
    let r = b
        .admin()
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(r.intact && r.entries > n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_filters_by_identity_action_and_time() {
    let b = TestBroker::start().await;
    b.identity("svc/a", |_| {}).await;
    b.identity("svc/b", |_| {}).await;
    b.attested("spiffe://example.org/svc/a", &["db"]).await;
    let mid = sigil_broker::clock::unix_nanos(std::time::SystemTime::now());
    b.attested("spiffe://example.org/svc/b", &["db"]).await;
    let q = |identity: &str, action: &str, since: i64| pb::ListAuditRequest {
        from_sequence: 1,
        limit: 1000,
        since_unix_nanos: since,
        identity: identity.into(),
        action: action.into(),
        last: 0,
    };
    let mut admin = b.admin();
    let parse = |r: pb::ListAuditResponse| -> Vec<serde_json::Value> {
        r.entries
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    };
    let for_a = parse(
        admin
            .list_audit(q("spiffe://example.org/svc/a", "", 0))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(!for_a.is_empty());
    let a_id = for_a[0]["target"].as_str().unwrap().to_owned();
    assert!(
        for_a.iter().all(|e| e["target"] == a_id.as_str()),
        "only identity a's entries"
    );
    let mints = parse(
        admin
            .list_audit(q("", "jwt.mint", 0))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(mints.len(), 2);
    assert!(mints.iter().all(|e| e["action"] == "jwt.mint"));
    let later = parse(
        admin
            .list_audit(q("", "x509.", mid))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(later.len(), 1, "since filters by time");
    assert_ne!(later[0]["target"], a_id.as_str());
    let tail = admin
        .list_audit(pb::ListAuditRequest {
            last: 3,
            ..q("", "", 0)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tail.entries.len(), 3);
    let all = b.audit().await;
    let last3: Vec<String> = all[all.len() - 3..]
        .iter()
        .map(|e| e["seq"].to_string())
        .collect();
    assert_eq!(
        parse(tail)
            .iter()
            .map(|e| e["seq"].to_string())
            .collect::<Vec<_>>(),
        last3,
        "tail returns the newest, oldest first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_request_id_reaches_the_reply_and_the_audit_entry() {
    // Every refusal written (not folded per interval), to see each one's request id.
    let b = TestBroker::start_configured(Arc::new(sigil_broker::clock::SystemClock), |c| {
        c.audit.aggregate_interval = std::time::Duration::ZERO
    })
    .await;
    b.identity("svc/a", |_| {}).await;
    let attest = |request_id: Option<&'static str>| {
        let mut req = tonic::Request::new(pb::AttestRequest {
            evidence: Some(pb::Evidence {
                kind: Some(pb::evidence::Kind::JoinToken(pb::JoinTokenEvidence {
                    token: "sjt_not-a-real-token".into(),
                })),
            }),
            csr: sigil_pki::csr::request_for(&sigil_pki::EcKey::generate().unwrap()).unwrap(),
            ..Default::default()
        });
        if let Some(id) = request_id {
            req.metadata_mut()
                .insert("x-request-id", id.parse().unwrap());
        }
        let mut c = sigil_tests::raw::anon(&b.url, &b.bundle_pem);
        async move { c.attest(req).await.unwrap_err() }
    };
    let reply_id = |s: &tonic::Status| {
        s.metadata()
            .get("sigil-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };

    let e = attest(Some("ci-job-4711.step-3")).await;
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(reply_id(&e), "ci-job-4711.step-3");
    // A header that is too long or not plain is replaced, never copied into the audit log.
    let e = attest(Some("evil\" {injected}")).await;
    let generated = reply_id(&e);
    assert_ne!(generated, "evil\" {injected}");
    assert_eq!(generated.len(), 16, "{generated}");

    let failures = b.audit_for("attest").await;
    let ids: Vec<&str> = failures
        .iter()
        .filter_map(|e| e["request_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["ci-job-4711.step-3", generated.as_str()],
        "{failures:#?}"
    );
}
