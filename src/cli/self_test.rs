//! `self-test`: synthetic dry-run reviews sent to a running webhook.
use std::process::ExitCode;

use super::parsers::parse_duration;

pub(super) const SELF_TEST_ABOUT: &str =
    "Send synthetic dry-run AdmissionReviews to a running webhook and \
check the answers.

Three requests, each on a new TLS connection verified against --ca-file: a valid KasprApp to \
/validate (must be allowed), an invalid one (must be denied, naming the field), and a StatefulSet \
owned by a KasprApp to /mutate. /mutate looks the app up (watch cache or API server), so without \
--app the StatefulSet names an app that does not exist and must be allowed unchanged; this \
also proves the webhook can read KasprApps (an unreadable app is a denial). With --app NAME, a \
KasprApp in --namespace that lists spec.pythonPackages, the answer must carry a well-formed \
JSON patch. Every answer must echo the request's uid and arrive within --max-response-time.

Prints one line per check and a summary. Exit status 0 when every check passed, 1 when one \
failed, 2 when the options are unusable (the message names the flag and its value). Every flag \
also reads KASPR_WEBHOOK_<FLAG> from the environment. The chart's `helm test` runs it.";

/// Options of `self-test`.
#[derive(Debug, clap::Args)]
pub struct SelfTestArgs {
    /// Base URL of the webhook; /mutate and /validate are appended,
    /// e.g. https://kaspr-packages-webhook.kaspr.svc:443.
    #[arg(long, env = "KASPR_WEBHOOK_URL", value_name = "URL")]
    pub url: url::Url,

    /// PEM file of the CA that signed the webhook's certificate (the caBundle).
    #[arg(long, env = "KASPR_WEBHOOK_CA_FILE", value_name = "FILE")]
    pub ca_file: std::path::PathBuf,

    /// Namespace of the synthetic objects.
    #[arg(
        long,
        env = "KASPR_WEBHOOK_NAMESPACE",
        value_name = "NS",
        default_value = "default"
    )]
    pub namespace: String,

    /// A KasprApp in --namespace listing spec.pythonPackages: its StatefulSet must be patched
    /// [default: an app that does not exist, answered unchanged].
    #[arg(long, env = "KASPR_WEBHOOK_APP", value_name = "NAME")]
    pub app: Option<String>,

    /// Deadline of each request: connection, TLS handshake and answer.
    #[arg(long, env = "KASPR_WEBHOOK_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,

    /// Slowest acceptable answer (the API server gives a webhook 10 s by default).
    #[arg(long, env = "KASPR_WEBHOOK_MAX_RESPONSE_TIME", value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub max_response_time: std::time::Duration,
}

pub(super) fn self_test(args: SelfTestArgs) -> ExitCode {
    let options = crate::selftest::SelfTestOptions {
        url: args.url,
        ca_file: args.ca_file,
        namespace: args.namespace,
        app: args.app,
        timeout: args.timeout,
        max_response_time: args.max_response_time,
    };
    match crate::selftest::run_blocking(&options) {
        Ok(report) => {
            for line in report.lines() {
                println!("{line}");
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}
