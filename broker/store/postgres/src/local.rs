//! A private PostgreSQL server in a temporary directory, on a free loopback port: for tests,
//! `sigil bench --store postgres` and trying replicas on one machine. It uses the PostgreSQL
//! binaries of the machine (Debian's `postgresql` package: `/usr/lib/postgresql/<v>/bin`, or
//! `PG_BIN`, or `PATH`). As root it runs them as the `postgres` user, since `initdb` refuses
//! root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running private PostgreSQL server; stopped (immediately) and deleted when dropped.
#[derive(Debug)]
pub struct LocalPostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// Run the binaries as this user (when we are root).
    run_as: Option<String>,
    _dir: tempfile::TempDir,
}

/// Why a private server could not be had.
#[derive(Debug)]
pub struct LocalError(pub String);

impl std::fmt::Display for LocalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LocalError {}

/// Where the PostgreSQL binaries are, if anywhere.
pub fn binaries() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("pg_ctl").exists() && d.join("initdb").exists())
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl LocalPostgres {
    /// `initdb` into a new temporary directory and start the server on a free loopback port,
    /// with durable commits (`fsync`, `synchronous_commit` on), as production runs it.
    pub fn start() -> Result<Self, LocalError> {
        let bin = binaries().ok_or_else(|| {
            LocalError(
                "no PostgreSQL binaries (install Debian's postgresql package, or set PG_BIN)"
                    .into(),
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("sigil-pg-")
            .tempdir()
            .map_err(|e| LocalError(format!("temp dir: {e}")))?;
        let run_as = is_root().then(|| "postgres".to_owned());
        let data = dir.path().join("data");
        if let Some(user) = &run_as {
            // The server's user must reach and own its directory.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                .map_err(|e| LocalError(format!("chmod: {e}")))?;
            std::fs::create_dir(&data).map_err(|e| LocalError(format!("mkdir: {e}")))?;
            let ok = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(&data)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err(LocalError(format!(
                    "cannot give {} to the {user} user (is the postgresql package installed?)",
                    data.display()
                )));
            }
        }
        let port = free_port()?;
        let pg = LocalPostgres {
            bin,
            data,
            port,
            run_as,
            _dir: dir,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&pg.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        pg.pg_ctl_start()?;
        Ok(pg)
    }

    /// The URL of database `db` (as the superuser `postgres`, trusted on loopback).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `name`.
    pub fn create_database(&self, name: &str) -> Result<(), LocalError> {
        self.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                name,
            ],
        )
    }

    /// Stops the server (`fast`: rolls back open transactions and disconnects clients).
    pub fn stop(&self) -> Result<(), LocalError> {
        self.run(
            "pg_ctl",
            &["-D", path_str(&self.data), "-m", "fast", "-w", "stop"],
        )
    }

    /// Starts it again after [`LocalPostgres::stop`], on the same port.
    pub fn start_again(&self) -> Result<(), LocalError> {
        self.pg_ctl_start()
    }

    /// `pg_ctl restart -m fast`: every client connection is cut.
    pub fn restart(&self) -> Result<(), LocalError> {
        self.stop()?;
        self.pg_ctl_start()
    }

    fn pg_ctl_start(&self) -> Result<(), LocalError> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on -c synchronous_commit=on",
            self.port,
            path_str(&self.data)
        );
        let log = self.data.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data),
                "-o",
                &opts,
                "-l",
                path_str(&log),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), LocalError> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| LocalError(format!("{}: {e}", exe.display())))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(LocalError(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", path_str(&self.data), "-m", "immediate", "-w", "stop"],
        );
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn free_port() -> Result<u16, LocalError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| LocalError(format!("finding a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| LocalError(format!("finding a free port: {e}")))
}
