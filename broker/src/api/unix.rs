//! The Unix socket: plain gRPC (the kernel, not TLS, says who the caller is). Each connection
//! carries the peer credentials from `SO_PEERCRED` and when it was accepted, for
//! [`crate::attest::unix`].

use std::io;
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use crate::attest::unix::UnixPeer;

/// A Unix connection that tells tonic who is on the other end.
pub type UnixConn = super::Conn<UnixStream, UnixPeer>;

/// Binds the socket at `path` with permissions `mode`, replacing a stale socket file (but
/// never another kind of file).
pub fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ));
        }
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
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

/// Removes the socket file when dropped.
#[derive(Debug)]
pub struct SocketGuard(pub PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
