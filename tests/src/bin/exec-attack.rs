//! The attacker of the Unix-attestation exec test, built from std alone (no unsafe code).
//!
//! `exec-attack SOCKET PROXY TRUSTED [ARGS...]`:
//! 1. connects to the broker's Unix socket (the kernel records this process's pid as the peer)
//!    and waits until the broker has accepted (its HTTP/2 SETTINGS frame arrives);
//! 2. starts a relay child that inherits the connection (as its stdin) and the bytes read so far;
//! 3. replaces itself with `TRUSTED ARGS...` (`exec`): the pid the broker knows now runs the
//!    trusted program, while the relay — the attacker — drives the connection.
//!
//! The relay (`exec-attack --relay PROXY PARENT_PID HEX`) waits until the parent runs another
//! program, then listens on `PROXY` and splices one client's connection onto the inherited
//! one, so a test can make ordinary gRPC calls as the attacker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--relay") {
        relay(&args[2], args[3].parse().expect("pid"), &args[4]);
        return;
    }
    let (socket, proxy, trusted) = (&args[1], &args[2], &args[3]);
    let mut conn = UnixStream::connect(socket).expect("connect to the broker");
    // The broker speaks first (its SETTINGS frame) once it has accepted the connection.
    let mut first = vec![0u8; 4096];
    let n = conn
        .read(&mut first)
        .expect("read the broker's first bytes");
    first.truncate(n);
    let hex: String = first.iter().map(|b| format!("{b:02x}")).collect();
    let me = std::env::current_exe().expect("own path");
    // Never waited for: this process is about to become another program; the relay ends with
    // its client or the connection.
    #[allow(clippy::zombie_processes)]
    Command::new(me)
        .args(["--relay", proxy, &std::process::id().to_string(), &hex])
        .stdin(Stdio::from(OwnedFd::from(conn)))
        .spawn()
        .expect("start the relay");
    let e = Command::new(trusted).args(&args[4..]).exec();
    panic!("exec {trusted}: {e}");
}

fn relay(proxy: &str, parent: u32, hex: &str) {
    let inherited = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .expect("the inherited connection");
    let broker = UnixStream::from(inherited);
    let own = std::fs::read_link("/proc/self/exe").expect("own exe");
    // Wait until the parent has become the trusted program.
    for _ in 0..500 {
        match std::fs::read_link(format!("/proc/{parent}/exe")) {
            Ok(p) if p != own => break,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let listener = UnixListener::bind(proxy).expect("bind the proxy socket");
    let (mut client, _) = listener.accept().expect("accept the test's client");
    let first: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    client
        .write_all(&first)
        .expect("replay the broker's first bytes");
    let mut to_broker = broker.try_clone().expect("clone");
    let mut from_client = client.try_clone().expect("clone");
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_broker);
        let _ = to_broker.shutdown(std::net::Shutdown::Write);
    });
    let mut from_broker = broker;
    let _ = std::io::copy(&mut from_broker, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}
