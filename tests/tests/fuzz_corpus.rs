//! Replays the fuzz corpora committed in `tests/fuzz/corpus/<target>/` through the fuzz targets
//! (`sigil_tests::fuzz`), so every interesting input the fuzzer found — and every crash it
//! found and we fixed — stays checked in the normal suite, and the targets keep building.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn every_committed_fuzz_input_is_handled_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut total = 0;
    for (name, target) in sigil_tests::fuzz::TARGETS {
        let dir = root.join(name);
        let mut n = 0;
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let data = std::fs::read(e.path()).unwrap();
                let r = std::panic::catch_unwind(|| target(&data));
                assert!(r.is_ok(), "{name}: {} panicked", e.path().display());
                n += 1;
            }
        }
        assert!(n > 0, "{name}: no seeds in {}", dir.display());
        total += n;
    }
    eprintln!("replayed {total} fuzz inputs");
}

/// Writes the starting seeds (valid inputs of every target) into the corpus directories:
/// `cargo test -p sigil-tests --test fuzz_corpus -- --ignored write_seeds`.
#[test]
#[ignore = "run by hand to (re)create the seed corpora"]
fn write_seeds() {
    use prost::Message as _;
    use sigil_proto::v1 as pb;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let put = |target: &str, name: &str, data: &[u8]| {
        let d = root.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), data).unwrap();
    };
    for (i, s) in [
        "spiffe://example.org/payments/api",
        "spiffe://example.org",
        "spiffe://Example.org/a/../b",
        "spiffe://example.org/a%20b",
        "unix:uid:1000\nunix:sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "k8s:ns:payments\noidc:claim:repository:acme/app",
    ]
    .iter()
    .enumerate()
    {
        put("spiffe_id", &format!("seed{i}"), s.as_bytes());
    }
    let key = sigil_pki::EcKey::generate().unwrap();
    let csr = sigil_pki::csr::request_for(&key).unwrap();
    put("csr", "valid", &csr);
    put("csr", "truncated", &csr[..csr.len() / 2]);
    put(
        "jwt",
        "signed",
        b"{\"alg\":\"ES256\",\"kid\":\"KID\",\"typ\":\"JWT\"}\0{\"sub\":\"spiffe://example.org/a\",\"aud\":[\"db\",\"x\"],\"exp\":1800000100,\"iat\":1800000000,\"jti\":\"j\",\"scope\":\"read\",\"sigil_gen\":1,\"act\":{\"sub\":\"spiffe://example.org/agent\"}}",
    );
    put("jwt", "dup", b"{\"alg\":\"ES256\",\"kid\":\"KID\"}\0{\"sub\":\"spiffe://example.org/a\",\"aud\":\"db\",\"aud\":\"x\",\"exp\":1800000100}");
    put("jwt", "plain", b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.AAAA");
    use base64::Engine as _;
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let oidc = format!(
        "{}.{}.{}",
        b.encode(r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#),
        b.encode(r#"{"iss":"https://idp.example","sub":"system:serviceaccount:payments:api","aud":["sigil"],"exp":4000000000,"iat":1800000000,"kubernetes.io":{"namespace":"payments","serviceaccount":{"name":"api","uid":"u"},"pod":{"name":"p","uid":"q"}}}"#),
        b.encode([7u8; 64])
    );
    put("oidc", "k8s", oidc.as_bytes());
    put(
        "config",
        "example",
        include_bytes!("../../deploy/sigil.toml"),
    );
    put(
        "config",
        "minimal",
        b"listen = \"127.0.0.1:9000\"\n[limits]\nmax_audiences = 4\n",
    );
    let attest = pb::AttestRequest {
        evidence: Some(pb::Evidence {
            kind: Some(pb::evidence::Kind::JoinToken(pb::JoinTokenEvidence {
                token: "sigil_jt_x".into(),
            })),
        }),
        csr,
        dns_names: vec!["app.internal".into()],
        jwts: vec![pb::JwtRequest {
            audiences: vec!["db".into(); 3],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut m = vec![0u8];
    m.extend(attest.encode_to_vec());
    put("requests", "attest", &m);
    let create = pb::CreateIdentityRequest {
        spiffe_id: "spiffe://example.org/a".into(),
        owner: "team".into(),
        purpose: "p".into(),
        selectors: vec!["unix:uid:1000".into()],
        labels: [("env".to_owned(), "prod".to_owned())].into(),
        ..Default::default()
    };
    let mut m = vec![6u8];
    m.extend(create.encode_to_vec());
    put("requests", "create", &m);
    let rec = sigil_store_core_identity();
    let mut m = vec![0u8];
    m.extend(serde_json::to_vec(&rec).unwrap());
    put("records", "identity", &m);
    put(
        "records",
        "checkpoint",
        b"\x08{\"seq\":6,\"hash\":\"00\",\"time\":1,\"mac\":\"00\"}",
    );
    put("audit_chain", "two", b"{\"seq\":1,\"time\":0,\"actor\":\"op\",\"action\":\"a\",\"target\":\"t\",\"decision\":\"allow\",\"reason\":\"r\",\"request_id\":\"q\",\"prev_hash\":\"0000000000000000000000000000000000000000000000000000000000000000\",\"hash\":\"00\"}\n{}");
}

fn sigil_store_core_identity() -> sigil_broker::model::IdentityRecord {
    sigil_broker::store::conformance::identity("id-1", "a")
}
