//! Unix attestation: on the broker's Unix socket the kernel tells us who connected (uid, gid,
//! pid, from `SO_PEERCRED`); `/proc/<pid>` gives the binary behind the pid (its path and the
//! SHA-256 of its contents).
//!
//! Binding the attestation to the connection: a connection is attested as the program that
//! opened it, never as one it turns into. When a connection is accepted we record what its
//! peer is ([`UnixPeer::observe`]: the pid's start time and the device and inode of the file
//! it runs), and every call on the connection checks that the process behind the pid is
//! still that process running that file. This defeats two attacks: pid reuse (the peer exits
//! and its pid is given to a process that runs a trusted program), and exec (the peer forks,
//! the parent `exec`s a trusted program, and the child — which inherited the connection —
//! drives it; the kernel still reports the parent's pid). We accept a call only if the
//! process (1) started no later than the connection was accepted, (2) has the start time
//! recorded at accept, before and after we read its binary, (3) runs the file recorded at
//! accept, and (4) still runs as the uid the kernel reported.
//!
//! What remains (see README's security notes): a process that `exec`s a trusted program in
//! the short window between its `connect()` and the broker's `accept()` is recorded as that
//! program; and any process of the same uid that may `ptrace` the trusted program can make it
//! do anything. The uid is the boundary the kernel enforces; hash and path selectors tell
//! apart programs of one uid that do not attack each other.
//!
//! Selectors: `unix:uid:N`, `unix:gid:N`, `unix:supplementary_gid:N`, `unix:path:/abs/path`,
//! `unix:sha256:HEX`.

use std::collections::{BTreeSet, HashMap};
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::sync::{Arc, Mutex};

use super::{AttestError, Attested, Method, Reason};
use crate::model::Selector;
use crate::registry::Registry;

/// What the kernel said about a connection on the Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    /// Effective uid at `connect()`.
    pub uid: u32,
    /// Effective gid at `connect()`.
    pub gid: u32,
    /// The connecting process.
    pub pid: Option<i32>,
    /// System uptime (clock ticks since boot, as in `/proc/<pid>/stat`) when the connection
    /// was accepted; a process that started later cannot be the peer.
    pub accepted_at_ticks: Option<u64>,
    /// The peer process's start time (clock ticks since boot) when the connection was
    /// accepted: a process with another start time behind the same pid is another process.
    pub start_time: Option<u64>,
    /// Device and inode of the file the peer ran when the connection was accepted: a process
    /// that runs another file since has replaced its program (`exec`).
    pub exe: Option<ExeId>,
}

/// Device and inode numbers of a program file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExeId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl UnixPeer {
    /// What the kernel says about a connection just accepted: its credentials, and a snapshot
    /// of the process behind the pid (start time, program file) that later calls are checked
    /// against. Cheap (two reads from `/proc`), so it runs in the accept loop.
    pub fn observe(uid: u32, gid: u32, pid: Option<i32>) -> UnixPeer {
        let accepted_at_ticks = uptime_ticks();
        let live = pid.filter(|p| *p > 0);
        UnixPeer {
            uid,
            gid,
            pid,
            accepted_at_ticks,
            start_time: live.and_then(|p| start_time(p).ok()),
            exe: live.and_then(|p| {
                std::fs::metadata(format!("/proc/{p}/exe"))
                    .ok()
                    .map(|m| ExeId {
                        dev: m.dev(),
                        ino: m.ino(),
                    })
            }),
        }
    }
}

/// The process behind a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// pid.
    pub pid: i32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// The binary's path (as the kernel reports it; ` (deleted)` when replaced on disk), or
    /// `None` when the broker may not read it (see `binary_unreadable`).
    pub path: Option<String>,
    /// Hex SHA-256 of the binary's contents, when readable.
    pub sha256: Option<String>,
    /// Why the binary could not be read: a broker without the right to inspect another
    /// user's process (not root, no `CAP_SYS_PTRACE`) still attests by uid and gid, but no
    /// `unix:path:` or `unix:sha256:` selector can match.
    pub binary_unreadable: Option<String>,
}

/// What a broker needs to read another user's program, said where a pinned identity could
/// not be matched for want of it.
pub const UNREADABLE_HINT: &str = "so `unix:path:` and `unix:sha256:` selectors cannot match; run the broker as root, as the workload's own user, or with CAP_SYS_PTRACE (systemd: AmbientCapabilities=CAP_SYS_PTRACE) to attest by binary";

impl ProcessInfo {
    /// The selectors this process yields.
    pub fn selectors(&self) -> BTreeSet<Selector> {
        let mut out = BTreeSet::new();
        let mut add = |v: String| {
            if let Ok(s) = format!("unix:{v}").parse() {
                out.insert(s);
            }
        };
        add(format!("uid:{}", self.uid));
        add(format!("gid:{}", self.gid));
        for g in &self.groups {
            add(format!("supplementary_gid:{g}"));
        }
        if let Some(p) = &self.path {
            add(format!("path:{p}"));
        }
        if let Some(h) = &self.sha256 {
            add(format!("sha256:{h}"));
        }
        out
    }

    /// How the process appears in audit entries.
    pub fn actor(&self) -> String {
        format!(
            "unix:uid={},pid={},path={}",
            self.uid,
            self.pid,
            self.path.as_deref().unwrap_or("(unreadable)")
        )
    }
}

// Reason codes: `no_pid`, `process_gone`, `pid_reused`, `exec`, `uid_changed`, `unreadable`.
pub use super::Rejection;
use super::reject;

/// Attests the caller on the Unix socket by what the kernel said about its connection
/// (`peer`; `None` off the socket): the process behind it is inspected (`hashes`, on the
/// blocking pool: it may read the binary) and its selectors must match an identity in
/// `registry` (`spiffe_id` names one when several do).
pub async fn attest(
    hashes: &Arc<HashCache>,
    registry: &Registry,
    peer: Option<UnixPeer>,
    spiffe_id: Option<&str>,
    now: i64,
) -> Result<Attested, AttestError> {
    let fail = |reason: Reason, msg: String| AttestError::Failed {
        method: Method::Unix,
        reason,
        actor: "unix".into(),
        identity_id: None,
        detail: msg.clone(),
        public: Some(msg),
    };
    let Some(peer) = peer else {
        return Err(fail(
            Reason::NotUnix,
            "unix evidence works only on the broker's Unix socket (workload_socket)".into(),
        ));
    };
    let h = hashes.clone();
    let info = tokio::task::spawn_blocking(move || h.inspect(&peer))
        .await
        .map_err(|e| fail(Reason::Unreadable, e.to_string()))?
        .map_err(|r| fail(r.reason, r.message))?;
    let selectors = info.selectors();
    let actor = info.actor();
    let identity =
        super::select(registry, Method::Unix, &selectors, spiffe_id, &actor).map_err(|mut e| {
            // Say why a binary-pinned identity could not match, and what fixes it.
            if let (Some(why), AttestError::Failed { detail, public, .. }) =
                (&info.binary_unreadable, &mut e)
            {
                let more = format!("; {why}, {UNREADABLE_HINT}");
                detail.push_str(&more);
                if let Some(p) = public {
                    p.push_str(&more);
                }
            }
            e
        })?;
    Ok(Attested {
        identity,
        method: Method::Unix,
        actor,
        consume_join_token: None,
        presented_generation: None,
        // The kernel's word is always fresh evidence.
        evidence_issued_at: Some(now),
        evidence_seq: None,
        selectors,
    })
}

/// Clock ticks since boot now (from `/proc/uptime`, in the 100 Hz ticks `/proc/<pid>/stat`
/// uses on Linux).
pub fn uptime_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some((secs * TICKS_PER_SEC as f64) as u64)
}

/// `sysconf(_SC_CLK_TCK)`; 100 on every Linux architecture Sigil targets.
const TICKS_PER_SEC: u64 = 100;

/// Caches binary hashes by (device, inode, size, mtime), so a busy workload's binary is read
/// once, not on every call.
#[derive(Debug, Default)]
pub struct HashCache {
    inner: Mutex<HashMap<BinaryId, String>>,
}

/// (device, inode, size, mtime seconds, mtime nanoseconds) of a binary.
type BinaryId = (u64, u64, u64, i64, i64);

const HASH_CACHE_MAX: usize = 4096;

fn start_time(pid: i32) -> Result<u64, Rejection> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|_| reject(Reason::ProcessGone, format!("process {pid} is gone")))?;
    // The command name (field 2) may contain spaces and ')'; fields after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| reject(Reason::Unreadable, "unexpected /proc stat format"))?;
    // After ')' come field 3 (state) onwards; starttime is field 22.
    rest.split_whitespace()
        .nth(22 - 3)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| reject(Reason::Unreadable, "unexpected /proc stat format"))
}

fn status_ids(pid: i32) -> Result<(Vec<u32>, Vec<u32>), Rejection> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| reject(Reason::ProcessGone, format!("process {pid} is gone")))?;
    let mut uids = Vec::new();
    let mut groups = Vec::new();
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            uids = v
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
        } else if let Some(v) = line.strip_prefix("Groups:") {
            groups = v
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
        }
    }
    Ok((uids, groups))
}

impl HashCache {
    /// Inspects the peer's process.
    pub fn inspect(&self, peer: &UnixPeer) -> Result<ProcessInfo, Rejection> {
        let pid = peer
            .pid
            .filter(|p| *p > 0)
            .ok_or_else(|| reject(Reason::NoPid, "the kernel did not report the caller's pid"))?;
        let before = start_time(pid)?;
        if let Some(accepted) = peer.accepted_at_ticks
            && before > accepted + 1
        {
            return Err(reject(
                Reason::PidReused,
                format!("process {pid} started after the connection was made; its pid was reused"),
            ));
        }
        if peer.start_time.is_some_and(|t| t != before) {
            return Err(reject(
                Reason::PidReused,
                format!(
                    "process {pid} is not the process that opened this connection (it exited and its pid was reused)"
                ),
            ));
        }
        let binary = match std::fs::read_link(format!("/proc/{pid}/exe")) {
            Ok(path) => Ok(self.identify(pid, peer, path.to_string_lossy().into_owned())?),
            // Another user's process and no right to inspect it: uid and gid still hold (the
            // kernel's word), the binary stays unknown. Only when it was unreadable at
            // connect too; readable then and not now means it exec'd something else.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && peer.exe.is_none() => {
                Err(format!(
                    "the broker may not read process {pid}'s binary ({e})"
                ))
            }
            Err(e) => {
                return Err(reject(
                    Reason::Unreadable,
                    format!("cannot read process {pid}'s binary: {e}"),
                ));
            }
        };
        let (uids, groups) = status_ids(pid)?;
        let after = start_time(pid)?;
        if after != before {
            return Err(reject(
                Reason::PidReused,
                format!("process {pid} was replaced while it was being inspected"),
            ));
        }
        // Real, effective, saved, filesystem: the reported uid must still be the effective one.
        if uids.get(1) != Some(&peer.uid) {
            return Err(reject(
                Reason::UidChanged,
                format!(
                    "process {pid} no longer runs as uid {} (it connected as that uid)",
                    peer.uid
                ),
            ));
        }
        let (path, sha256, binary_unreadable) = match binary {
            Ok((path, sha256)) => (Some(path), Some(sha256), None),
            Err(why) => (None, None, Some(why)),
        };
        Ok(ProcessInfo {
            uid: peer.uid,
            gid: peer.gid,
            pid,
            groups: groups.into_iter().filter(|g| *g != peer.gid).collect(),
            path,
            sha256,
            binary_unreadable,
        })
    }

    /// The program process `pid` runs (its `path`), checked to be the one it ran when it
    /// connected, and its hash: `(path, sha256)`.
    fn identify(
        &self,
        pid: i32,
        peer: &UnixPeer,
        path: String,
    ) -> Result<(String, String), Rejection> {
        // /proc/<pid>/exe opens the very file the process runs, even if it was replaced.
        let mut f = std::fs::File::open(format!("/proc/{pid}/exe")).map_err(|e| {
            reject(
                Reason::Unreadable,
                format!("cannot read process {pid}'s binary: {e}"),
            )
        })?;
        let meta = f
            .metadata()
            .map_err(|e| reject(Reason::Unreadable, e.to_string()))?;
        let now_running = ExeId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        match peer.exe {
            Some(at_accept) if at_accept == now_running => {}
            Some(_) => {
                return Err(reject(
                    Reason::Exec,
                    format!(
                        "process {pid} replaced its program (exec) after it opened this connection; a connection is attested only as the program that opened it, so open a new one"
                    ),
                ));
            }
            None => {
                return Err(reject(
                    Reason::Exec,
                    format!(
                        "the program of process {pid} could not be identified when it opened this connection; open a new one"
                    ),
                ));
            }
        }
        let key = (
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
        );
        let cached = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let sha256 = match cached {
            Some(h) => h,
            None => {
                let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = f
                        .read(&mut buf)
                        .map_err(|e| reject(Reason::Unreadable, e.to_string()))?;
                    if n == 0 {
                        break;
                    }
                    ctx.update(&buf[..n]);
                }
                let h = sigil_pki::ids::to_hex(ctx.finish().as_ref());
                let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                if c.len() >= HASH_CACHE_MAX {
                    c.clear();
                }
                c.insert(key, h.clone());
                h
            }
        };
        Ok((path, sha256))
    }
}

/// Hex SHA-256 of a file, as `unix:sha256:` selectors want it (for `sigil identity create`
/// helpers and tests).
pub fn file_sha256(path: &std::path::Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(sigil_pki::ids::to_hex(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> UnixPeer {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().nth(1))
                .unwrap()
                .parse()
                .unwrap()
        };
        UnixPeer::observe(
            field("Uid:"),
            field("Gid:"),
            Some(std::process::id() as i32),
        )
    }

    #[test]
    fn inspecting_this_process_names_its_binary_and_hash() {
        let cache = HashCache::default();
        let info = cache.inspect(&me()).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(info.path.as_deref(), Some(&*exe.to_string_lossy()));
        assert_eq!(info.sha256, Some(file_sha256(&exe).unwrap()));
        assert_eq!(info.binary_unreadable, None);
        let sel: Vec<String> = info.selectors().iter().map(|s| s.to_string()).collect();
        assert!(sel.contains(&format!("unix:uid:{}", me().uid)), "{sel:?}");
        assert!(sel.contains(&format!("unix:sha256:{}", info.sha256.as_deref().unwrap())));
        // Cached the second time, same answer.
        assert_eq!(cache.inspect(&me()).unwrap(), info);
    }

    #[test]
    fn a_process_that_started_after_the_connection_is_refused() {
        let mut p = me();
        p.accepted_at_ticks = Some(0);
        assert_eq!(
            HashCache::default().inspect(&p).unwrap_err().reason,
            Reason::PidReused
        );
        let mut p = me();
        p.uid = p.uid.wrapping_add(4242);
        assert_eq!(
            HashCache::default().inspect(&p).unwrap_err().reason,
            Reason::UidChanged
        );
        p.pid = None;
        assert_eq!(
            HashCache::default().inspect(&p).unwrap_err().reason,
            Reason::NoPid
        );
    }

    #[test]
    fn a_process_that_is_not_what_connected_is_refused() {
        // Another start time behind the same pid: another process.
        let mut p = me();
        p.start_time = p.start_time.map(|t| t + 1);
        let e = HashCache::default().inspect(&p).unwrap_err();
        assert_eq!(e.reason, Reason::PidReused, "{e:?}");
        // Another program file since the connection was accepted: an exec.
        let mut p = me();
        p.exe = p.exe.map(|x| ExeId {
            ino: x.ino ^ 1,
            ..x
        });
        let e = HashCache::default().inspect(&p).unwrap_err();
        assert_eq!(e.reason, Reason::Exec, "{e:?}");
        assert!(e.message.contains("replaced its program"), "{}", e.message);
        // Nothing recorded at accept: refused rather than trusted.
        let mut p = me();
        p.exe = None;
        assert_eq!(
            HashCache::default().inspect(&p).unwrap_err().reason,
            Reason::Exec
        );
    }
}
