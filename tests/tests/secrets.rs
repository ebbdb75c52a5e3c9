//! No secret ever reaches the logs or the audit trail: a run of everyday operations, then a
//! search of every log line (trace level) and the whole audit export for the exact join
//! tokens, JWTs and private keys the run created. Alone in its own test binary because it
//! captures the process's logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use clap::Parser as _;
use sigil_proto::v1 as pb;
use sigil_sdk::{Evidence, JwtRequest, SvidOptions};
use sigil_tests::TestBroker;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn pem_body(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_audit_never_hold_a_join_token_a_jwt_or_a_private_key() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("sigil_broker=trace,sigil_sdk=trace,sigil_pki=trace,info")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let b = TestBroker::start().await;
    b.identity("svc/a", |r| {
        r.entitlements.as_mut().unwrap().audiences = vec!["db".into(), "api".into()]
    })
    .await;
    let id = "spiffe://example.org/svc/a";
    let mut secrets: Vec<String> = Vec::new();

    // Attestation with JWTs, renewal and more JWTs over mTLS.
    let token = b.join_token(id).await;
    secrets.push(token.clone());
    let w = b.workload();
    let creds = w
        .attest(
            Evidence::JoinToken(token.clone().into()),
            SvidOptions::default(),
            &[JwtRequest::audience("db")],
        )
        .await
        .unwrap();
    secrets.push(creds.jwts[0].token.expose_secret().to_owned());
    secrets.extend(pem_body(
        std::str::from_utf8(creds.svid.private_key_pem().expose_secret()).unwrap(),
    ));
    let _ = w
        .attest(
            Evidence::JoinToken(token.into()),
            SvidOptions::default(),
            &[],
        )
        .await; // replay
    let renewed = w.renew_x509_svid().await.unwrap();
    secrets.extend(pem_body(
        std::str::from_utf8(renewed.private_key_pem().expose_secret()).unwrap(),
    ));
    let jwt = w
        .fetch_jwt_svid(&JwtRequest::audience("api"))
        .await
        .unwrap();
    secrets.push(jwt.token.expose_secret().to_owned());
    let _ = w.introspect_token(jwt.token.expose_secret()).await.unwrap();
    assert!(
        w.fetch_jwt_svid(&JwtRequest::audience("nope"))
            .await
            .is_err()
    );

    // `sigil fetch` writes a key to disk.
    let t2 = b.join_token(id).await;
    secrets.push(t2.clone());
    let out = b.dir.path().join("out");
    let bundle = b.data.join("bundle.pem");
    let cli = sigil_cli::Cli::parse_from([
        "sigil",
        "fetch",
        "--broker",
        &b.url,
        "--trust-bundle",
        bundle.to_str().unwrap(),
        "--join-token",
        &t2,
        "--out",
        out.to_str().unwrap(),
        "--audience",
        "db",
    ]);
    sigil_cli::run(cli).await.unwrap();
    secrets.extend(pem_body(
        &std::fs::read_to_string(out.join("svid.key")).unwrap(),
    ));
    secrets.push(
        std::fs::read_to_string(out.join("jwt-db.txt"))
            .unwrap()
            .trim()
            .to_owned(),
    );

    // A well-formed token that was never issued, and a leak report that carries a real JWT.
    let bogus = format!("sigil_jt_{}", "A".repeat(43));
    secrets.push(bogus.clone());
    let _ = b
        .workload()
        .attest(
            Evidence::JoinToken(bogus.into()),
            SvidOptions::default(),
            &[],
        )
        .await;
    let leaked = w.fetch_jwt_svid(&JwtRequest::audience("db")).await.unwrap();
    secrets.push(leaked.token.expose_secret().to_owned());
    b.admin()
        .report_leak(pb::ReportLeakRequest {
            material: leaked.token.expose_secret().to_owned(),
            reason: "test".into(),
            dry_run: false,
        })
        .await
        .unwrap();

    // The broker's own secrets.
    secrets.extend(pem_body(
        &std::fs::read_to_string(b.data.join("admin/admin.key")).unwrap(),
    ));
    secrets.push(b.master.to_base64().expose_secret().to_owned());

    let audit = serde_json::to_string(&b.audit().await).unwrap();
    let log_text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        log_text.contains("attestation failed"),
        "the logs were captured"
    );
    for s in &secrets {
        assert!(s.len() >= 16);
        assert!(
            !log_text.contains(s.as_str()),
            "a secret is in the logs: {}...",
            &s[..12]
        );
        assert!(
            !audit.contains(s.as_str()),
            "a secret is in the audit trail: {}...",
            &s[..12]
        );
    }
    // Not even the signature part of a JWT.
    for jwt in secrets.iter().filter(|s| s.matches('.').count() == 2) {
        let sig = jwt.rsplit('.').next().unwrap();
        assert!(!log_text.contains(sig) && !audit.contains(sig));
    }
}
