//! README.md is true: every ```sh block runs, in order, in one shell, against the real `sigil`
//! binary and a real broker, and the run fails on the first command that fails (`set -e`).
//!
//! A block is skipped only when the line before it says why: `<!-- not run: REASON -->`. The
//! one liberty taken: absolute system paths (`/var/lib/`, `/run/`) are rooted in a temp dir,
//! so the test needs no root and leaves nothing behind. Ports are the README's own (8443,
//! 8080), checked free first.

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");

/// A block of README.md: the line of its opening fence and its text (or the reason it is skipped).
type Block = (usize, String);

/// The README's shell blocks to run, and the skipped ones with their reasons.
fn blocks(readme: &str) -> (Vec<Block>, Vec<Block>) {
    let mut run = Vec::new();
    let mut skipped = Vec::new();
    let lines: Vec<&str> = readme.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_start().starts_with("```") {
            let lang = lines[i].trim_start().trim_start_matches('`').trim();
            let start = i;
            let mut body = String::new();
            i += 1;
            while i < lines.len() && !lines[i].trim_start().starts_with("```") {
                body.push_str(lines[i]);
                body.push('\n');
                i += 1;
            }
            if lang == "sh" {
                let before = start
                    .checked_sub(1)
                    .map(|b| lines[b].trim())
                    .unwrap_or_default();
                match before
                    .strip_prefix("<!-- not run:")
                    .and_then(|r| r.strip_suffix("-->"))
                {
                    Some(reason) => skipped.push((start + 1, reason.trim().to_owned())),
                    None => run.push((start + 1, body)),
                }
            }
        }
        i += 1;
    }
    (run, skipped)
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn the_readme_blocks_a_skip_needs_a_reason() {
    let (run, skipped) = blocks("a\n```sh\necho 1\n```\n<!-- not run: why -->\n```sh\nx\n```\n");
    assert_eq!(run, vec![(2, "echo 1\n".to_owned())]);
    assert_eq!(skipped, vec![(6, "why".to_owned())]);
}

#[test]
fn every_command_in_the_readme_works_as_written_in_one_shell() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .expect("README.md");
    let (run, skipped) = blocks(&readme);
    assert!(run.len() >= 5, "the README's tour is runnable: {run:?}");
    for (line, reason) in &skipped {
        assert!(
            reason.len() > 10,
            "README.md:{line}: a skipped block says why"
        );
    }
    for port in [8443, 8080] {
        assert!(
            port_free(port),
            "port {port} is in use on 127.0.0.1: the README's commands use it; stop what holds it"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let work = tmp.path().join("work");
    let home = tmp.path().join("home");
    for d in [&root, &work, &home] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut script = String::from("set -euo pipefail\n");
    for (line, body) in &run {
        let body = body
            .replace("/var/lib/", &format!("{}/var/lib/", root.display()))
            .replace("/run/", &format!("{}/run/", root.display()));
        script.push_str(&format!("echo '== README.md:{line}' >&2\n{body}\n"));
    }
    script.push_str("echo '== README.md: done' >&2\n");
    let bin_dir = Path::new(SIGIL).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(&script)
        .current_dir(&work)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &home)
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().expect("bash");
    let pgid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The broker the README started in the background (and anything else) ends with it.
    let kill = |sig: rustix::process::Signal| {
        if let Some(pid) = rustix::process::Pid::from_raw(pgid) {
            let _ = rustix::process::kill_process_group(pid, sig);
        }
    };
    kill(rustix::process::Signal::TERM);
    std::thread::sleep(Duration::from_millis(300));
    kill(rustix::process::Signal::KILL);
    let _ = child.wait();
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).ok();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    let status = status.unwrap_or_else(|| {
        panic!("the README's commands did not finish within 180 s\n--- stdout\n{out}\n--- stderr\n{err}")
    });
    assert!(
        status.success() && err.contains("== README.md: done"),
        "a README command failed ({status}); the last '== README.md:N' line names its block\n--- stdout\n{out}\n--- stderr\n{err}"
    );
    eprintln!("--- stdout\n{out}\n--- stderr\n{err}");
    // What the tour promises, seen: files with the right modes, and the restored store.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&work.join("payments/svid.key")), 0o600);
    assert_eq!(mode(&work.join("payments/jwt-db.txt")), 0o600);
    assert!(
        work.join("backup/svid.pem").exists(),
        "the Unix-socket fetch wrote files"
    );
    assert!(
        root.join("var/lib/sigil-new/sigil.redb").exists(),
        "restored"
    );
}
