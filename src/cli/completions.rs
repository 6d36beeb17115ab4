//! `completions`: shell completion scripts from the command definition.
use std::process::ExitCode;

use super::Cli;

pub(super) const COMPLETIONS_ABOUT: &str = "Print a shell completion script to stdout.

  bash: kaspr-packages-webhook completions bash > ~/.local/share/bash-completion/completions/kaspr-packages-webhook
  zsh:  kaspr-packages-webhook completions zsh > \"${fpath[1]}/_kaspr-packages-webhook\"
  fish: kaspr-packages-webhook completions fish > ~/.config/fish/completions/kaspr-packages-webhook.fish";

/// Options of `completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: ShellArg,
}

/// Shells with completion scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

/// The completion script of `shell`.
pub fn completion_script(shell: ShellArg) -> Vec<u8> {
    let shell = match shell {
        ShellArg::Bash => clap_complete::Shell::Bash,
        ShellArg::Zsh => clap_complete::Shell::Zsh,
        ShellArg::Fish => clap_complete::Shell::Fish,
    };
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "kaspr-packages-webhook", &mut out);
    out
}

pub(super) fn completions(args: &CompletionsArgs) -> ExitCode {
    use std::io::Write as _;
    let script = completion_script(args.shell);
    match std::io::stdout().lock().write_all(&script) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: writing the completion script: {error}");
            ExitCode::FAILURE
        }
    }
}
