use super::*;
use clap::CommandFactory;

fn serve_args(args: &[&str]) -> Result<ServeArgs, clap::Error> {
    let mut argv = vec!["kaspr-packages-webhook", "serve"];
    argv.extend_from_slice(args);
    match Cli::try_parse_from(argv)?.command {
        Command::Serve(args) => Ok(*args),
        _ => panic!("not serve"),
    }
}

/// Every flag of `subcommand` reads `KASPR_WEBHOOK_<FLAG>`; with `with_help`, each has help text.
pub(super) fn assert_flags_read_their_environment_variables(subcommand: &str, with_help: bool) {
    let command = Cli::command();
    let found = command.find_subcommand(subcommand).expect(subcommand);
    for arg in found.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" || arg.is_positional() {
            continue;
        }
        let expected = format!("KASPR_WEBHOOK_{}", id.to_uppercase());
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some(expected.as_str()),
            "--{id}"
        );
        if with_help {
            assert!(arg.get_help().is_some(), "--{id} has no help text");
        }
    }
}

#[test]
fn every_serve_flag_reads_its_environment_variable() {
    assert_flags_read_their_environment_variables("serve", true);
}

#[test]
fn defaults_are_local_and_safe() {
    let options = serve_args(&[]).expect("parse").into_options();
    let settings = &options.settings;
    assert_eq!(settings.listen.to_string(), "127.0.0.1:8443");
    assert_eq!(settings.probe_listen.to_string(), "127.0.0.1:8080");
    assert_eq!(settings.max_body_bytes, 3 * 1024 * 1024);
    assert_eq!(
        settings.answer_cache_bytes,
        crate::admission::AnswerCache::BUDGET_BYTES
    );
    assert_eq!(settings.request_timeout, std::time::Duration::from_secs(8));
    assert_eq!(
        settings.shutdown_timeout,
        std::time::Duration::from_secs(20)
    );
    assert!(matches!(
        options.certs,
        crate::server::CertSource::SelfSigned { .. }
    ));
    assert!(matches!(
        options.apps,
        crate::server::AppSource::Cluster { ref namespaces } if namespaces.is_empty()
    ));
    assert_eq!(
        options.controller,
        crate::controller::ControllerOptions {
            pvc: true,
            rollout: true,
            builds: false,
            unreachable_grace: std::time::Duration::from_secs(60),
            rollout_budget: 0,
            rollout_deadline: std::time::Duration::from_secs(600),
        }
    );
}

#[test]
fn controller_parts_can_be_switched_off() {
    let options = serve_args(&[
        "--controller-pvc=false",
        "--controller-rollout",
        "false",
        "--builds=true",
        "--unreachable-grace=5s",
        "--rollout-budget=2",
        "--rollout-deadline=90s",
    ])
    .expect("parse")
    .into_options();
    assert_eq!(
        options.controller,
        crate::controller::ControllerOptions {
            pvc: false,
            rollout: false,
            builds: true,
            unreachable_grace: std::time::Duration::from_secs(5),
            rollout_budget: 2,
            rollout_deadline: std::time::Duration::from_secs(90),
        }
    );
    assert!(serve_args(&["--builds=sometimes"]).is_err());
    assert!(serve_args(&["--rollout-budget=-1"]).is_err());
    assert!(serve_args(&["--rollout-deadline=soon"]).is_err());
    assert!(serve_args(&["--controller-pvc=maybe"]).is_err());
}

#[test]
fn flags_turn_into_options() {
    let options = serve_args(&[
        "--listen",
        "0.0.0.0:9443",
        "--tls-cert",
        "/certs/tls.crt",
        "--tls-key",
        "/certs/tls.key",
        "--namespaces",
        "a, b,",
        "--request-timeout",
        "3",
        "--shutdown-timeout",
        "1m",
        "--init-container-resources",
        r#"{"requests":{"cpu":"100m","memory":"256Mi"},"limits":{"memory":"1Gi"}}"#,
        "--packages-volume-size-limit",
        "4Gi",
    ])
    .expect("parse")
    .into_options();
    assert_eq!(
        options.settings.render.operator_packages,
        crate::spec::OperatorPackages::Respect,
        "respect unless told"
    );
    assert_eq!(
        options.settings.render.install_tool,
        crate::spec::InstallTool::Pip,
        "pip unless told"
    );
    assert_eq!(
        serve_args(&["--install-tool", "auto"])
            .expect("parse")
            .into_options()
            .settings
            .render
            .install_tool,
        crate::spec::InstallTool::Auto
    );
    assert_eq!(
        serve_args(&["--operator-packages", "takeover"])
            .expect("parse")
            .into_options()
            .settings
            .render
            .operator_packages,
        crate::spec::OperatorPackages::Takeover
    );
    assert_eq!(
        options.settings.render.packages_volume_size_limit,
        Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            "4Gi".into()
        ))
    );
    assert_eq!(options.settings.listen.to_string(), "0.0.0.0:9443");
    assert_eq!(
        options.settings.request_timeout,
        std::time::Duration::from_secs(3)
    );
    assert_eq!(
        options.settings.shutdown_timeout,
        std::time::Duration::from_secs(60)
    );
    assert!(matches!(
        options.certs,
        crate::server::CertSource::Files { .. }
    ));
    match options.apps {
        crate::server::AppSource::Cluster { namespaces } => assert_eq!(namespaces, ["a", "b"]),
        other => panic!("unexpected {other:?}"),
    }
    let resources = options
        .settings
        .render
        .default_resources
        .expect("resources");
    let requests = resources.requests.expect("requests");
    assert_eq!(requests["cpu"].0, "100m");
    assert_eq!(resources.limits.expect("limits")["memory"].0, "1Gi");
}

#[test]
fn self_managed_certificate_flags_turn_into_options() {
    let options = serve_args(&[
        "--self-managed-certs",
        "--cert-secret",
        "hook-certs",
        "--cert-namespace",
        "system",
        "--webhook-configs",
        "hook, other",
        "--service-name",
        "hook",
        "--cert-extra-names",
        "127.0.0.1",
        "--cert-dir",
        "/run/certs",
        "--cert-validity",
        "90s",
        "--cert-renew-before",
        "60s",
        "--cert-overlap",
        "10s",
        "--cert-check-interval",
        "1s",
    ])
    .expect("parse")
    .into_options();
    let crate::server::CertSource::SelfManaged(certs) = options.certs else {
        panic!("not self-managed: {:?}", options.certs);
    };
    assert_eq!(certs.secret, "hook-certs");
    assert_eq!(certs.webhook_configs, ["hook", "other"]);
    assert_eq!(certs.dir, std::path::PathBuf::from("/run/certs"));
    assert_eq!(certs.overlap, std::time::Duration::from_secs(10));
    assert!(
        serve_args(&["--self-managed-certs"]).is_err(),
        "needs --cert-secret"
    );
    assert!(
        serve_args(&["--cert-secret", "x"]).is_err(),
        "needs --self-managed-certs"
    );
    assert!(
        serve_args(&[
            "--self-managed-certs",
            "--cert-secret",
            "x",
            "--tls-cert",
            "/c",
            "--tls-key",
            "/k"
        ])
        .is_err()
    );
}

#[test]
fn inconsistent_flags_are_refused() {
    assert!(serve_args(&["--tls-cert", "/c"]).is_err());
    assert!(serve_args(&["--kasprapps", "/d", "--namespaces", "a"]).is_err());
    assert!(serve_args(&["--init-container-resources", "{\"request\":{}}"]).is_err());
    assert!(serve_args(&["--packages-volume-size-limit", "lots"]).is_err());
    assert!(serve_args(&["--operator-packages", "replace"]).is_err());
    assert!(serve_args(&["--install-tool", "poetry"]).is_err());
    assert!(serve_args(&["--packages-volume-size-limit", "0"]).is_err());
    assert!(serve_args(&["--init-container-resources", "cpu=1"]).is_err());
    assert!(serve_args(&["--request-timeout", "soon"]).is_err());
    assert!(serve_args(&["--log-format", "xml"]).is_err());
}

#[test]
fn every_self_test_flag_reads_its_environment_variable() {
    assert_flags_read_their_environment_variables("self-test", false);
}

#[test]
fn self_test_needs_a_url_and_a_ca_file() {
    let parse = |args: &[&str]| {
        let mut argv = vec!["kaspr-packages-webhook", "self-test"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
    };
    assert!(parse(&["--url", "https://hook.kaspr.svc"]).is_err());
    assert!(parse(&["--url", "not a url", "--ca-file", "/ca"]).is_err());
    let cli = parse(&["--url", "https://hook.kaspr.svc:443", "--ca-file", "/ca"]).expect("parse");
    let Command::SelfTest(args) = cli.command else {
        panic!("not self-test")
    };
    assert_eq!(args.namespace, "default");
    assert_eq!(args.app, None);
    assert_eq!(args.max_response_time, std::time::Duration::from_secs(2));
    let cli = parse(&[
        "--url=https://hook.kaspr.svc",
        "--ca-file=/ca",
        "--namespace=kaspr",
        "--namespace=apps",
    ])
    .expect("a later flag wins");
    let Command::SelfTest(args) = cli.command else {
        panic!("not self-test")
    };
    assert_eq!(args.namespace, "apps");
}

#[test]
fn a_kubectl_plugin_name_becomes_the_displayed_command() {
    let name = |argv0: &str| plugin_bin_name(std::ffi::OsStr::new(argv0));
    assert_eq!(
        name("/usr/local/bin/kubectl-kaspr_packages").as_deref(),
        Some("kubectl kaspr-packages")
    );
    assert_eq!(name("kaspr-packages-webhook"), None);
    assert_eq!(name("/usr/bin/kaspr-packages-webhook"), None);
}

#[rstest::rstest]
#[case::bash(ShellArg::Bash, "complete -F")]
#[case::zsh(ShellArg::Zsh, "#compdef kaspr-packages-webhook")]
#[case::fish(ShellArg::Fish, "complete -c kaspr-packages-webhook")]
fn completions_cover_every_subcommand(#[case] shell: ShellArg, #[case] marker: &str) {
    let script = String::from_utf8(completion_script(shell)).expect("UTF-8");
    assert!(script.contains(marker), "{script}");
    for subcommand in [
        "preview",
        "validate",
        "serve",
        "self-test",
        "completions",
        "installer",
        "explain",
    ] {
        assert!(script.contains(subcommand), "{subcommand} missing");
    }
    assert!(script.contains("max-response-time"));
    assert!(script.contains("webhook-config"));
}
