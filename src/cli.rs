//! The command line: the only module that uses clap.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "kaspr-packages-webhook", version, about = "Python packages for Kaspr apps: admission webhook, preview and validation")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the embedded installer program.
    Installer,
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Installer => {
            print!("{}", crate::installer::SOURCE);
            ExitCode::SUCCESS
        }
    }
}
