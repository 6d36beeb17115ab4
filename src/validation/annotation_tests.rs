//! Settings read from KasprApp annotations, and the securityContexts of
//! `spec.template.kasprContainer` and `spec.template.pythonPackagesInitContainer`.

use rstest::rstest;
use serde_json::{Value, json};

use super::*;
use crate::spec::{Cache, GcsKeySecret, InstallTool, OperatorPackages};

fn app(annotations: Value, python_packages: Value) -> Value {
    let mut app = json!({
        "apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
        "metadata": {"name": "my-app", "namespace": "default"},
        "spec": {}
    });
    app["metadata"]["annotations"] = annotations;
    app["spec"]["pythonPackages"] = python_packages;
    app
}

fn errors(report: &Report) -> Vec<String> {
    report.errors.iter().map(ToString::to_string).collect()
}

fn gcs(secret_ref: Option<Value>) -> Value {
    let mut packages =
        json!({"packages": ["a==1"], "cache": {"type": "gcs", "gcs": {"bucket": "kaspr-cache"}}});
    if let Some(secret_ref) = secret_ref {
        packages["cache"]["gcs"]["secretRef"] = secret_ref;
    }
    packages
}

#[rstest]
#[case::absent(json!({}), None)]
#[case::respect(json!({"packages.kaspr.io/operator-packages": "respect"}), Some(OperatorPackages::Respect))]
#[case::takeover(json!({"packages.kaspr.io/operator-packages": "takeover"}), Some(OperatorPackages::Takeover))]
fn the_operator_packages_annotation_selects_the_mode(
    #[case] annotations: Value,
    #[case] expected: Option<OperatorPackages>,
) {
    let report = validate_kasprapp(&app(annotations, json!({"packages": ["a==1"]})));
    assert_eq!(errors(&report), Vec::<String>::new());
    assert_eq!(report.spec.expect("spec").operator_packages, expected);
}

#[rstest]
#[case::absent(json!({}), None)]
#[case::auto(json!({"packages.kaspr.io/install-tool": "auto"}), Some(InstallTool::Auto))]
#[case::uv(json!({"packages.kaspr.io/install-tool": "uv"}), Some(InstallTool::Uv))]
#[case::pip(json!({"packages.kaspr.io/install-tool": "pip"}), Some(InstallTool::Pip))]
fn the_install_tool_annotation_selects_the_tool(
    #[case] annotations: Value,
    #[case] expected: Option<InstallTool>,
) {
    let report = validate_kasprapp(&app(annotations, json!({"packages": ["a==1"]})));
    assert_eq!(errors(&report), Vec::<String>::new());
    assert_eq!(report.spec.expect("spec").install_tool, expected);
}

#[rstest]
#[case::install_tool_word(
    "packages.kaspr.io/install-tool", json!("poetry"),
    "metadata.annotations.packages.kaspr.io/install-tool: \"poetry\" is not one of \"auto\", \"pip\", \"uv\""
)]
#[case::operator_packages_word(
    "packages.kaspr.io/operator-packages", json!("Takeover"),
    "metadata.annotations.packages.kaspr.io/operator-packages: \"Takeover\" is not one of \"respect\", \"takeover\""
)]
#[case::operator_packages_not_a_string(
    "packages.kaspr.io/operator-packages", json!(true),
    "metadata.annotations.packages.kaspr.io/operator-packages: must be a string, got true"
)]
#[case::gcs_auth_word(
    "packages.kaspr.io/gcs-auth", json!("wi"),
    "metadata.annotations.packages.kaspr.io/gcs-auth: \"wi\" is not one of \"secret\", \"workload-identity\""
)]
#[case::mode_word(
    "packages.kaspr.io/mode", json!("oci"),
    "metadata.annotations.packages.kaspr.io/mode: \"oci\" is not one of \"image\", \"cache\""
)]
fn a_bad_annotation_is_an_error_naming_it_and_its_value(
    #[case] key: &str,
    #[case] value: Value,
    #[case] expected: &str,
) {
    let report = validate_kasprapp(&app(json!({key: value}), json!({"packages": ["a==1"]})));
    assert_eq!(errors(&report), [expected]);
    // An app without packages is not concerned.
    let report = validate_kasprapp(&app(json!({key: value}), Value::Null));
    assert_eq!(report, Report::default());
}

#[test]
fn workload_identity_by_annotation_ignores_the_secret_the_crd_requires() {
    let report = validate_kasprapp(&app(
        json!({"packages.kaspr.io/gcs-auth": "workload-identity"}),
        gcs(Some(json!({"name": "unused"}))),
    ));
    assert_eq!(errors(&report), Vec::<String>::new());
    let Some(Cache::Gcs(cache)) = report.spec.as_ref().map(|s| &s.cache) else {
        panic!("gcs mode");
    };
    assert_eq!(cache.key_secret, None);
    assert!(
        report.warning_lines().iter().any(|w| w
            .starts_with("spec.pythonPackages.cache.gcs.secretRef:")
            && w.contains("\"unused\"")),
        "{:?}",
        report.warning_lines()
    );
}

#[test]
fn gcs_auth_secret_needs_the_secret() {
    let report = validate_kasprapp(&app(
        json!({"packages.kaspr.io/gcs-auth": "secret"}),
        gcs(None),
    ));
    assert_eq!(
        errors(&report),
        [
            "spec.pythonPackages.cache.gcs.secretRef: is required when annotation packages.kaspr.io/gcs-auth is \"secret\""
        ]
    );
    let report = validate_kasprapp(&app(
        json!({"packages.kaspr.io/gcs-auth": "secret"}),
        gcs(Some(json!({"name": "gcs-key"}))),
    ));
    let Cache::Gcs(cache) = report.spec.expect("spec").cache else {
        panic!("gcs mode");
    };
    assert_eq!(
        cache.key_secret,
        Some(GcsKeySecret {
            name: "gcs-key".into(),
            key: "sa.json".into()
        })
    );
}

#[test]
fn a_bad_annotation_on_an_update_that_keeps_it_is_ratcheted() {
    let old = app(
        json!({"packages.kaspr.io/operator-packages": "yes"}),
        json!({"packages": ["a==1"]}),
    );
    let mut new = old.clone();
    new["metadata"]["labels"] = json!({"team": "a"});
    let mut report = validate_kasprapp(&new);
    assert!(matches!(
        ratchet(&mut report, &old, &new),
        Ratchet::Unchanged(_)
    ));
    assert!(report.errors.is_empty());
    new["metadata"]["annotations"]["packages.kaspr.io/operator-packages"] = json!("no");
    let mut report = validate_kasprapp(&new);
    assert_eq!(ratchet(&mut report, &old, &new), Ratchet::Nothing);
    assert_eq!(report.errors.len(), 1);
}

#[test]
fn declared_security_contexts_are_read_not_warned_about() {
    let mut kasprapp = app(json!({}), json!({"packages": ["a==1"]}));
    kasprapp["spec"]["template"] = json!({
        "kasprContainer": {"securityContext": {"runAsUser": 1000}},
        "pythonPackagesInitContainer": {"securityContext": {"runAsNonRoot": true}}
    });
    let report = validate_kasprapp(&kasprapp);
    assert_eq!(report.warning_lines(), Vec::<String>::new());
    let spec = report.spec.expect("spec");
    assert_eq!(
        spec.main_security_context,
        json!({"runAsUser": 1000}).as_object().cloned()
    );
    assert_eq!(
        spec.init_container.security_context,
        json!({"runAsNonRoot": true}).as_object().cloned()
    );
}

#[test]
fn a_malformed_security_context_is_an_error_and_loosening_fields_are_ignored() {
    let mut kasprapp = app(json!({}), json!({"packages": ["a==1"]}));
    kasprapp["spec"]["template"] = json!({
        "kasprContainer": {"securityContext": {"runAsUser": "root"}},
        "pythonPackagesInitContainer": {"securityContext": {"privileged": true}}
    });
    let report = validate_kasprapp(&kasprapp);
    let errs = errors(&report);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(
            "spec.template.kasprContainer.securityContext: is not a valid container securityContext"
        ),
        "{errs:?}"
    );
    assert!(
        report.warning_lines().iter().any(|w| w.starts_with(
            "spec.template.pythonPackagesInitContainer.securityContext.privileged: the installer always runs unprivileged"
        )),
        "{:?}",
        report.warning_lines()
    );
}

#[test]
fn a_move_request_that_names_no_possible_revision_is_a_warning_not_an_error() {
    let asked = validate_kasprapp(&app(
        json!({"packages.kaspr.io/move-to-revision": "canary"}),
        json!({"packages": ["a==1"]}),
    ));
    assert_eq!(errors(&asked), Vec::<String>::new());
    assert!(
        asked.warning_lines().is_empty(),
        "{:?}",
        asked.warning_lines()
    );
    let report = validate_kasprapp(&app(
        json!({"packages.kaspr.io/move-to-revision": "Canary!"}),
        json!({"packages": ["a==1"]}),
    ));
    assert_eq!(errors(&report), Vec::<String>::new());
    assert_eq!(
        report.warning_lines(),
        [
            "metadata.annotations.packages.kaspr.io/move-to-revision: revision \"Canary!\" must be 1-63 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit; no app moves for it"
        ]
    );
}
