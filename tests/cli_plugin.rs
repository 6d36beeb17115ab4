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
            String::from_utf8_lossy(&output.stdout).contains("self-test")
                && String::from_utf8_lossy(&output.stdout).contains("explain"),
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

#[test]
fn explain_as_a_plugin_and_its_error_exit_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = dir.path().join("kubectl-kaspr_packages");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kaspr-packages-webhook"), &plugin)
        .expect("symlink");
    let output = Command::new(&plugin)
        .args(["explain", "--help"])
        .env_clear()
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("Usage: kubectl kaspr-packages explain"),
        "{help}"
    );
    assert!(help.contains("4  problem found"), "{help}");

    // An unusable kubeconfig, and an API server that is not there: 1, with the reason.
    let missing = dir.path().join("missing.kubeconfig");
    let output = Command::new(&plugin)
        .args(["explain", "pod", "x", "-n", "apps", "--kubeconfig"])
        .arg(&missing)
        .env_clear()
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("error: kubeconfig: "));

    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let kubeconfig = dir.path().join("refused.kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
         clusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n\
         users: [{name: u, user: {}}]\n\
         contexts: [{name: c, context: {cluster: c, user: u, namespace: apps}}]\n",
    )
    .expect("write");
    let output = Command::new(&plugin)
        .args([
            "explain",
            "sts",
            "demo-app",
            "--timeout",
            "10s",
            "--kubeconfig",
        ])
        .arg(&kubeconfig)
        .env_clear()
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: reading StatefulSet apps/demo-app: "),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}
