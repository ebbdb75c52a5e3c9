//! `sigil completion SHELL` and `sigil man --out DIR`: shell completions and man pages,
//! generated from the same definitions the parser uses (so they never drift).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Args, CommandFactory as _};

/// `sigil completion`.
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

/// `sigil man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write `sigil.1` and one page per command (`sigil-serve.1`, ...) into.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

/// Prints the completion script for a shell.
pub(crate) fn completion(a: CompletionArgs) -> Result<()> {
    let mut cmd = crate::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "sigil", &mut script);
    // A reader that stops early (`| head`) is not an error.
    match std::io::Write::write_all(&mut std::io::stdout(), &script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Writes the man pages.
pub(crate) fn man(a: ManArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let cmd = crate::Cli::command();
    clap_mangen::generate_to(cmd, &a.out)
        .with_context(|| format!("writing man pages into {}", a.out.display()))?;
    let n = std::fs::read_dir(&a.out)?
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "1"))
        .count();
    println!("wrote {n} man pages into {}", a.out.display());
    Ok(())
}
