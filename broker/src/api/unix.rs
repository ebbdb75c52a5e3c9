//! The Unix socket: plain gRPC (the kernel, not TLS, says who the caller is). Each connection
//! carries the peer credentials from `SO_PEERCRED` and when it was accepted, for
//! [`crate::attest::unix`].

use std::io;
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use crate::attest::unix::UnixPeer;

/// A Unix connection that tells tonic who is on the other end.
pub type UnixConn = super::Conn<UnixStream, UnixPeer>;

/// Binds the socket at `path` with permissions `mode`.
///
/// A socket file left by a broker that died is replaced; one that a live process still
/// listens on is not (a second broker configured with the same path would otherwise unlink
/// the first one's socket and leave it running but unreachable), and neither is any other
/// kind of file. The guard removes the socket at exit only if the path still names the
/// socket this call made.
pub fn bind(path: &Path, mode: u32) -> io::Result<(UnixListener, SocketGuard)> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another process is listening on {} (a second broker with the same workload_socket?); stop it or set another path with --workload-socket",
                        path.display()
                    ),
                ));
            }
            // Nobody listens: a stale file from a broker that did not exit cleanly.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)?;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot tell whether a process listens on {}: {e}",
                        path.display()
                    ),
                ));
            }
        }
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    let meta = std::fs::symlink_metadata(path)?;
    let guard = SocketGuard {
        path: path.to_owned(),
        id: (meta.dev(), meta.ino()),
    };
    Ok((l, guard))
}

/// Accepted connections with their peer credentials, until `cancel`.
///
/// Every connection takes a slot of `budget` (per uid and in total); one over budget is
/// closed at once, and so is one that sends nothing within `first_read`.
pub fn incoming(
    listener: UnixListener,
    budget: std::sync::Arc<crate::conns::ConnLimit>,
    first_read: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) -> impl tokio_stream::Stream<Item = io::Result<UnixConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let conn = match accepted {
                Ok((s, _)) => {
                    match s.peer_cred() {
                        // What the peer is now; every call checks it still is (exec, pid reuse).
                        Ok(c) => match budget.admit(&c.uid().to_string()) {
                            Ok(slot) => {
                                UnixConn::new(s, UnixPeer::observe(c.uid(), c.gid(), c.pid()))
                                    .with_slot(slot)
                                    .with_first_read_deadline(first_read)
                            }
                            Err(_) => continue,
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "no peer credentials on a Unix connection");
                            continue;
                        }
                    }
                }
                Err(e) => {
                    budget.log_once(|| format!("accept on the Unix socket failed: {e}"));
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Removes the socket file this broker made when dropped, and only that one: if the path
/// now names another file (another broker's socket), it is left alone.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    /// Device and inode of the socket file `bind` made.
    id: (u64, u64),
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_live_socket_is_never_taken_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.sock");
        let (live, guard) = bind(&path, 0o600).unwrap();
        // A second broker on the same path is refused and the first one's socket stays.
        let e = bind(&path, 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(
            e.to_string().contains("another process is listening"),
            "{e}"
        );
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        // Once nobody listens, the file is stale and is replaced.
        drop(live);
        std::mem::forget(guard);
        let (_l, guard2) = bind(&path, 0o600).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        // A guard whose socket was replaced by another's leaves the new one alone.
        let stale_guard = SocketGuard {
            path: path.clone(),
            id: (0, 0),
        };
        drop(stale_guard);
        assert!(path.exists());
        drop(guard2);
        assert!(!path.exists());
        // Any other kind of file is never replaced.
        std::fs::write(&path, b"x").unwrap();
        let e = bind(&path, 0o600).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }
}
