//! The `sigil` binary: parse flags, set up logging, run the command.

use clap::Parser as _;
use sigil_cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal, and never with NO_COLOR set: files and journald
    // get plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    match sigil_cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A failure reaching the broker names which broker and which bundle file.
            let talking = e.chain().any(|c| {
                c.downcast_ref::<sigil_sdk::SdkError>().is_some_and(|s| {
                    matches!(
                        s.code(),
                        None | Some(tonic::Code::Unavailable | tonic::Code::Unknown)
                    )
                })
            });
            if talking && let Some(t) = sigil_cli::target() {
                eprintln!("  ({t})");
            }
            std::process::ExitCode::from(sigil_cli::exit_code(&e))
        }
    }
}
