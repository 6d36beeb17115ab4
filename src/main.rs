use std::process::ExitCode;

fn main() -> ExitCode {
    // One crypto provider for every TLS user in the process (server and kube client).
    let _ = rustls::crypto::ring::default_provider().install_default();
    kaspr_packages_webhook::cli::run()
}
