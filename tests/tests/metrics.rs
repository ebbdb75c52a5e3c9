//! Observability: Prometheus metrics count issuances exactly, gRPC health, server reflection.
//! Alone in its own test binary: the metrics recorder is per process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sigil_sdk::JwtRequest;
use sigil_tests::TestBroker;

fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape =
        prometheus_parse::Scrape::parse(lines).expect("/metrics parses as Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_issuances_exactly_and_health_and_reflection_answer() {
    let b = TestBroker::start().await;
    b.identity("svc/a", |_| {}).await;
    let (w, _) = b
        .attested("spiffe://example.org/svc/a", &["db", "db"])
        .await;
    for _ in 0..5 {
        w.fetch_jwt_svid(&JwtRequest::audience("db")).await.unwrap();
    }
    for _ in 0..3 {
        w.renew_x509_svid().await.unwrap();
    }
    for _ in 0..2 {
        assert!(
            w.fetch_jwt_svid(&JwtRequest::audience("prod-db"))
                .await
                .is_err()
        );
    }
    let (status, text) = b.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &text,
            "sigil_issuance_total",
            &[("kind", "jwt"), ("result", "issued")]
        ),
        7.0,
        "2 at attest + 5"
    );
    assert_eq!(
        sample(
            &text,
            "sigil_issuance_total",
            &[("kind", "x509"), ("result", "issued")]
        ),
        4.0,
        "1 at attest + 3 renewals"
    );
    assert_eq!(
        sample(
            &text,
            "sigil_issuance_total",
            &[
                ("kind", "jwt"),
                ("result", "denied"),
                ("gate", "gate2.entitlement_scope")
            ]
        ),
        2.0
    );
    assert_eq!(
        sample(&text, "sigil_live_credentials", &[]),
        11.0 + 1.0 + 1.0,
        "issued credentials, the broker's own certificate and the operator's"
    );
    assert_eq!(
        sample(&text, "sigil_identities", &[("status", "active")]),
        1.0
    );
    assert!(
        text.contains("sigil_store_commit_seconds_bucket"),
        "commit latency histogram"
    );
    assert!(
        text.contains("sigil_store_commit_batch_size_bucket"),
        "group-commit batch sizes"
    );
    assert!(
        text.contains(
            "grpc_service=\"sigil.v1.Broker\",grpc_method=\"MintJwtSvid\",grpc_code=\"OK\""
        ),
        "request latency by service, method and status name: {text}"
    );
    // Conventions: build info, process metrics, gauges present from the start.
    assert!(
        text.contains("sigil_build_info{version=\""),
        "sigil_build_info"
    );
    for m in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(text.lines().any(|l| l.starts_with(m)), "{m} is exported");
    }
    assert!(
        text.lines().any(|l| l.starts_with("sigil_watch_streams ")),
        "sigil_watch_streams is there even before any stream"
    );
    // promtool (Debian's prometheus package) finds nothing to complain about.
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) => sigil_tests::skip("promtool is not installed (Debian: prometheus)"),
    }
    assert!(text.contains("sigil_key_rotation_due_seconds{kind=\"jwt\"}"));
    // A failed attestation is counted by method and reason.
    let _ = b
        .workload()
        .attest(
            sigil_sdk::Evidence::JoinToken("sigil_jt_nope".to_owned().into()),
            Default::default(),
            &[],
        )
        .await;
    let (_, text) = b.http_get("/metrics").await;
    assert_eq!(
        sample(
            &text,
            "sigil_attestation_failures_total",
            &[("method", "join_token"), ("reason", "malformed")]
        ),
        1.0
    );

    // gRPC health.
    let roots = sigil_sdk::transport::roots_from_pem(&b.bundle_pem).unwrap();
    let ch = sigil_sdk::transport::channel(
        &sigil_sdk::transport::BrokerTarget::parse(&b.url).unwrap(),
        sigil_sdk::transport::client_config(roots, None).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in ["", "sigil.v1.Broker", "sigil.v1.Admin"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    // Server reflection lists the services, as grpcurl would ask.
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["sigil.v1.Broker", "sigil.v1.Admin", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
}
