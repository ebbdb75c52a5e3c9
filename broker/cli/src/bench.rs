//! `sigil bench`: the bench's flags (from the sigil-bench crate) with which broker to measure.

use anyhow::Result;
use clap::Args;

use crate::Conn;

/// `sigil bench`: the bench's own flags, and which broker (none: an embedded one).
#[derive(Debug, Args)]
pub struct BenchCmd {
    #[command(flatten)]
    args: sigil_bench::BenchArgs,
    #[command(flatten)]
    conn: Conn,
}

/// Runs `sigil bench`: against the broker the flags name, or (without any) an embedded one.
pub(crate) async fn run(b: BenchCmd) -> Result<()> {
    let external =
        if b.conn.broker.is_some() || b.conn.data_dir.is_some() || b.conn.profile.is_some() {
            Some(b.conn.for_bench()?)
        } else {
            None
        };
    sigil_bench::run(b.args, external).await
}
