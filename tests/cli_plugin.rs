//! The binary under its kubectl plugin name, and its completion scripts.
use std::process::Command;

#[test]
fn as_a_kubectl_plugin_help_names_the_kubectl_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = dir.path().join("kubectl-kaspr_packages");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kaspr-packages-webhook"), &plugin)
        .expect("symlink");
    let output = Command::new(&plugin)
        .args(["self-test", "--help"])
        .env_clear()
        .output()
        .expect("runs");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("Usage: kubectl kaspr-packages self-test"),
        "{help}"
    );
    let output = Command::new(&plugin)
        .args(["validate", "/nonexistent.yaml"])
        .env_clear()
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn completions_print_a_script_per_shell_and_refuse_others() {
    let binary = env!("CARGO_BIN_EXE_kaspr-packages-webhook");
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(binary)
            .args(["completions", shell])
            .env_clear()
            .output()
            .expect("runs");
        assert!(output.status.success(), "{shell}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("self-test"),
            "{shell}"
        );
    }
    let output = Command::new(binary)
        .args(["completions", "powershell"])
        .env_clear()
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("powershell"));
}
