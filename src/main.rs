use std::process::ExitCode;

// Admission reviews allocate and free thousands of small JSON nodes each; mimalloc's
// thread-local free lists cost less CPU per review than glibc malloc (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // One crypto provider for every TLS user in the process (server and kube client).
    let _ = rustls::crypto::ring::default_provider().install_default();
    kaspr_packages_webhook::cli::run()
}
