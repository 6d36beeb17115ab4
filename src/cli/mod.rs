//! The command line: the only module that uses clap.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
#[derive(Debug, Parser)]
#[command(
    name = "kaspr-packages-webhook",
    version,
    about = "Python packages for Kaspr apps: admission webhook, preview and validation"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Render what the webhook would do to a StatefulSet or Pod of a KasprApp, offline.
    #[command(long_about = PREVIEW_ABOUT)]
    Preview(PreviewArgs),
    /// Check KasprApp files; warnings go to stderr; exit 1 if any is invalid.
    Validate(ValidateArgs),
    /// Print the embedded installer program.
    Installer,
    /// Run the admission webhook: HTTPS `/mutate` and `/validate`, plain-HTTP probes and metrics.
    #[command(long_about = SERVE_ABOUT)]
    Serve(Box<ServeArgs>),
    /// Send synthetic dry-run AdmissionReviews to a running webhook and check the answers.
    // A later flag wins over an earlier one, so the chart's tests.extraArgs can override its own.
    #[command(name = "self-test", long_about = SELF_TEST_ABOUT, args_override_self = true)]
    SelfTest(SelfTestArgs),
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    #[command(long_about = COMPLETIONS_ABOUT)]
    Completions(CompletionsArgs),
    /// Explain from the live cluster why a pod, StatefulSet or KasprApp is (not) injected.
    #[command(long_about = explain::EXPLAIN_ABOUT)]
    Explain(explain::ExplainArgs),
}

/// The name the program was started as, when it is a kubectl plugin (`kubectl-kaspr_packages`):
/// then help and completions say `kubectl kaspr-packages`.
fn plugin_bin_name(argv0: &std::ffi::OsStr) -> Option<String> {
    let file = std::path::Path::new(argv0).file_name()?.to_str()?;
    let plugin = file.strip_prefix("kubectl-")?;
    Some(format!("kubectl {}", plugin.replace('_', "-")))
}

pub fn run() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let cli = match plugin_bin_name(&argv0) {
        None => Cli::parse(),
        Some(bin_name) => {
            let matches = <Cli as clap::CommandFactory>::command()
                .bin_name(bin_name)
                .get_matches();
            <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
        }
    };
    match cli.command {
        Command::Preview(args) => preview(args),
        Command::Validate(args) => validate(&args),
        Command::Installer => {
            print!("{}", crate::installer::SOURCE);
            ExitCode::SUCCESS
        }
        Command::Serve(args) => serve(*args),
        Command::SelfTest(args) => self_test(args),
        Command::Completions(args) => completions(&args),
        Command::Explain(args) => explain::explain(args),
    }
}

mod completions;
mod explain;
mod parsers;
mod preview;
mod self_test;
mod serve;

use completions::{COMPLETIONS_ABOUT, completions};
pub use completions::{CompletionsArgs, ShellArg, completion_script};
pub use parsers::OperatorPackagesArg;
use preview::{PREVIEW_ABOUT, preview, validate};
pub use preview::{PreviewArgs, PreviewOutputArg, ValidateArgs};
pub use self_test::SelfTestArgs;
use self_test::{SELF_TEST_ABOUT, self_test};
pub use serve::{LogFormatArg, ServeArgs};
use serve::{SERVE_ABOUT, serve};

#[cfg(test)]
mod serve_args_tests;
