//! A separate program for the Unix attestation tests: it attests over the broker's Unix socket
//! with its own peer credentials and prints the SPIFFE ID it got (or `error: ...`), so a test
//! can show that a different binary under the same uid does not get another's identity.
//!
//! Usage: `unix-probe SOCKET BUNDLE_PEM [SPIFFE_ID]`, or `unix-probe --sleep SECS` to just run
//! (the trusted program an attacker `exec`s in the exec-attack test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sigil_sdk::{ClientConfig, Evidence, SvidOptions, WorkloadClient};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--sleep") {
        let secs = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(60);
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        return;
    }
    let socket = &args[1];
    let bundle = std::fs::read(&args[2]).expect("bundle");
    let client =
        WorkloadClient::new(ClientConfig::new(format!("unix://{socket}"), bundle)).expect("client");
    let options = SvidOptions {
        spiffe_id: args.get(3).cloned(),
        ..Default::default()
    };
    match client.attest(Evidence::Unix, options, &[]).await {
        Ok(c) => println!("{}", c.svid.spiffe_id),
        Err(e) => {
            println!("error: {e}");
            std::process::exit(1);
        }
    }
}
