//! `preview` and `validate`: the offline commands.
use std::process::ExitCode;

use super::parsers::RenderArgs;

pub(super) const PREVIEW_ABOUT: &str = "Render what the webhook would do, without a cluster.

Reads a KasprApp (YAML or JSON) and a StatefulSet or Pod (--object FILE, or - for stdin). \
Without --object, the StatefulSet is the one the Kaspr operator renders for the app \
(<app>-app, owned by the KasprApp, main container `kaspr`). Prints the mutated object \
(default YAML) or the JSON patch the webhook would answer with. Warnings go to stderr. \
Exits 1, listing every error with its field path, when the KasprApp is invalid.";

/// Output format of `preview`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PreviewOutputArg {
    /// The mutated object as YAML.
    Yaml,
    /// The mutated object as JSON.
    Json,
    /// The RFC 6902 JSON patch.
    Patch,
}

/// Options of `preview`.
#[derive(Debug, clap::Args)]
pub struct PreviewArgs {
    /// The KasprApp file (YAML or JSON).
    #[arg(long, env = "KASPR_WEBHOOK_KASPRAPP", value_name = "FILE")]
    pub kasprapp: std::path::PathBuf,

    /// The StatefulSet or Pod to mutate (YAML or JSON; - reads stdin)
    /// [default: the StatefulSet the Kaspr operator renders for the app].
    #[arg(long, env = "KASPR_WEBHOOK_OBJECT", value_name = "FILE|-")]
    pub object: Option<String>,

    /// What to print.
    #[arg(
        long,
        short,
        env = "KASPR_WEBHOOK_OUTPUT",
        value_enum,
        default_value = "yaml"
    )]
    pub output: PreviewOutputArg,

    /// The app's lock ConfigMap (YAML or JSON, as `kubectl get configmap
    /// <app>-python-packages-lock -o yaml` prints it): render as the webhook does with builds
    /// on, the current package set or, in image mode, its image.
    #[arg(long, env = "KASPR_WEBHOOK_LOCK", value_name = "FILE")]
    pub lock: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub render: RenderArgs,
}

/// Options of `validate`.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// KasprApp files (YAML, several documents allowed, or JSON).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<std::path::PathBuf>,
}

pub(super) fn read_input(path: &str) -> Result<String, String> {
    if path == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("stdin: {e}"))?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))
    }
}

pub(super) fn preview(args: PreviewArgs) -> ExitCode {
    let PreviewArgs {
        kasprapp,
        object,
        lock,
        output,
        render,
    } = args;
    let result = (|| -> Result<crate::preview::Preview, String> {
        let app_name = kasprapp.display().to_string();
        let app = crate::preview::parse_one(&read_input(&app_name)?, &app_name)
            .map_err(|e| e.to_string())?;
        let object = match object {
            Some(path) => {
                let name = if path == "-" {
                    "stdin".to_owned()
                } else {
                    path.clone()
                };
                Some(
                    crate::preview::parse_one(&read_input(&path)?, &name)
                        .map_err(|e| e.to_string())?,
                )
            }
            None => None,
        };
        let config = render.into_config();
        let output = match output {
            PreviewOutputArg::Yaml => crate::preview::Output::Yaml,
            PreviewOutputArg::Json => crate::preview::Output::Json,
            PreviewOutputArg::Patch => crate::preview::Output::Patch,
        };
        let lock = match lock {
            Some(path) => {
                let name = path.display().to_string();
                Some(
                    crate::preview::parse_one(&read_input(&name)?, &name)
                        .map_err(|e| e.to_string())?,
                )
            }
            None => None,
        };
        crate::preview::preview_with_lock(&app, object, output, &config, lock.as_ref())
            .map_err(|e| e.to_string())
    })();
    match result {
        Ok(preview) => {
            for warning in &preview.warnings {
                eprintln!("Warning: {warning}");
            }
            print!("{}", preview.text);
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

pub(super) fn validate(args: &ValidateArgs) -> ExitCode {
    let mut failed = false;
    for path in &args.files {
        let name = path.display().to_string();
        let reports = read_input(&name).and_then(|text| {
            crate::preview::validate_text(&text, &name).map_err(|e| e.to_string())
        });
        match reports {
            Err(message) => {
                eprintln!("error: {message}");
                failed = true;
            }
            Ok(reports) => {
                for (label, report) in reports {
                    for warning in &report.warnings {
                        eprintln!("Warning: {label}: {warning}");
                    }
                    if report.errors.is_empty() {
                        println!("{label}: valid");
                    } else {
                        failed = true;
                        println!("{label}: invalid");
                        for error in &report.errors {
                            println!("  {error}");
                        }
                    }
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
