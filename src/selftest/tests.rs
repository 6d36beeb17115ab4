use super::*;
use rstest::rstest;

fn answer(response: &Value) -> Vec<u8> {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
        .to_string()
        .into_bytes()
}

fn probe(expect: Expect) -> Probe {
    Probe {
        name: "p".into(),
        path: "/mutate",
        uid: "u".into(),
        review: Value::Null,
        expect,
    }
}

fn patch_of(ops: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(ops.to_string())
}

const FAST: Duration = Duration::from_millis(3);
const LIMIT: Duration = Duration::from_secs(2);

#[rstest]
#[case::allowed_unchanged(Expect::AllowedUnchanged, json!({"uid": "u", "allowed": true}))]
#[case::patched(Expect::AllowedPatched, json!({"uid": "u", "allowed": true, "patchType": "JSONPatch",
    "patch": patch_of(&json!([{"op": "add", "path": "/a", "value": 1}]))}))]
#[case::denied(Expect::Denied("packages[0]"), json!({"uid": "u", "allowed": false,
    "status": {"message": "KasprApp x: spec.pythonPackages.packages[0]: ..."}}))]
fn good_answers_pass(#[case] expect: Expect, #[case] response: Value) {
    let result = check_answer(&probe(expect), 200, &answer(&response), FAST, LIMIT);
    assert!(result.is_ok(), "{result:?}");
}

#[rstest]
#[case::other_uid(Expect::AllowedUnchanged, json!({"uid": "v", "allowed": true}), "response.uid")]
#[case::no_allowed(Expect::AllowedUnchanged, json!({"uid": "u"}), "response.allowed")]
#[case::denied(Expect::AllowedUnchanged, json!({"uid": "u", "allowed": false, "status": {"message": "nope"}}), "denied: nope")]
#[case::unexpected_patch(Expect::AllowedUnchanged, json!({"uid": "u", "allowed": true, "patchType": "JSONPatch",
    "patch": patch_of(&json!([{"op": "add", "path": "/a", "value": 1}]))}), "unexpected patch")]
#[case::missing_patch(Expect::AllowedPatched, json!({"uid": "u", "allowed": true}), "without a patch")]
#[case::patch_not_base64(Expect::AllowedPatched, json!({"uid": "u", "allowed": true, "patchType": "JSONPatch", "patch": "%%"}), "not base64")]
#[case::patch_not_json_patch(Expect::AllowedPatched, json!({"uid": "u", "allowed": true, "patchType": "JSONPatch",
    "patch": patch_of(&json!({"op": "add"}))}), "not an RFC 6902")]
#[case::patch_empty(Expect::AllowedPatched, json!({"uid": "u", "allowed": true, "patchType": "JSONPatch",
    "patch": patch_of(&json!([]))}), "empty JSON patch")]
#[case::patch_type(Expect::AllowedPatched, json!({"uid": "u", "allowed": true,
    "patch": patch_of(&json!([{"op": "add", "path": "/a", "value": 1}]))}), "patchType")]
#[case::allowed_not_denied(Expect::Denied("x"), json!({"uid": "u", "allowed": true}), "expected a denial")]
#[case::denial_reason(Expect::Denied("packages[0]"), json!({"uid": "u", "allowed": false, "status": {"message": "other"}}), "does not mention")]
fn bad_answers_fail_with_a_reason(
    #[case] expect: Expect,
    #[case] response: Value,
    #[case] reason: &str,
) {
    let error = check_answer(&probe(expect), 200, &answer(&response), FAST, LIMIT)
        .expect_err("must fail");
    assert!(error.contains(reason), "{error}");
}

#[test]
fn status_envelope_and_time_are_checked() {
    let p = probe(Expect::AllowedUnchanged);
    let good = answer(&json!({"uid": "u", "allowed": true}));
    assert!(
        check_answer(&p, 400, b"bad", FAST, LIMIT)
            .expect_err("status")
            .contains("HTTP status 400")
    );
    assert!(
        check_answer(&p, 200, b"<html>", FAST, LIMIT)
            .expect_err("json")
            .contains("not JSON")
    );
    assert!(
        check_answer(&p, 200, br#"{"kind":"Status"}"#, FAST, LIMIT)
            .expect_err("envelope")
            .contains("AdmissionReview")
    );
    assert!(
        check_answer(&p, 200, &good, Duration::from_secs(3), LIMIT)
            .expect_err("slow")
            .contains("over the limit of 2000 ms")
    );
}

#[test]
fn probes_are_dry_runs_with_unique_uids() {
    let probes = probes("apps", Some("demo"), "n1");
    assert_eq!(probes.len(), 3);
    for p in &probes {
        assert_eq!(p.review["request"]["dryRun"], true);
        assert_eq!(p.review["request"]["uid"], p.uid.as_str());
        assert!(p.uid.contains("n1"));
    }
    let statefulset = &probes[2];
    assert_eq!(statefulset.expect, Expect::AllowedPatched);
    assert_eq!(
        crate::app::owning_app(&statefulset.review["request"]["object"]).as_deref(),
        Some("demo")
    );
    let absent = super::probes("apps", None, "n1");
    assert_eq!(absent[2].expect, Expect::AllowedUnchanged);
}

#[test]
fn the_synthetic_kasprapps_are_judged_as_expected_by_the_validation() {
    let probes = probes("apps", None, "n");
    let valid = crate::validation::validate_kasprapp(&probes[0].review["request"]["object"]);
    assert!(valid.errors.is_empty(), "{:?}", valid.errors);
    let invalid = crate::validation::validate_kasprapp(&probes[1].review["request"]["object"]);
    let message = invalid.error_message("KasprApp x");
    let Expect::Denied(needle) = probes[1].expect else {
        panic!("expects a denial")
    };
    assert!(message.contains(needle), "{message}");
}

#[rstest]
#[case::http("http://hook.example:443", "must start with https://")]
#[case::credentials("https://u:p@hook.example", "credentials")]
#[case::query("https://hook.example/?a=1", "query")]
fn bad_urls_are_refused_with_the_value(#[case] url: &str, #[case] reason: &str) {
    let options = SelfTestOptions {
        url: url::Url::parse(url).expect("url"),
        ca_file: PathBuf::from("/ca.crt"),
        namespace: "default".into(),
        app: None,
        timeout: LIMIT,
        max_response_time: LIMIT,
    };
    let error = check_options(&options).expect_err("refused").to_string();
    assert!(error.starts_with("--url "), "{error}");
    assert!(error.contains(reason), "{error}");
}

#[test]
fn bad_names_and_ca_files_are_refused_with_the_value() {
    let mut options = SelfTestOptions {
        url: url::Url::parse("https://hook.example").expect("url"),
        ca_file: PathBuf::from("/nonexistent/ca.crt"),
        namespace: "Bad_NS".into(),
        app: None,
        timeout: LIMIT,
        max_response_time: LIMIT,
    };
    assert_eq!(
        check_options(&options).expect_err("ns").to_string(),
        "--namespace Bad_NS: not a valid namespace name"
    );
    options.namespace = "apps".into();
    options.app = Some("-x".into());
    assert!(
        check_options(&options)
            .expect_err("app")
            .to_string()
            .starts_with("--app -x")
    );
    let error = client_config(&options.ca_file)
        .expect_err("missing")
        .to_string();
    assert!(
        error.starts_with("--ca-file /nonexistent/ca.crt: "),
        "{error}"
    );
    let dir = tempfile::tempdir().expect("dir");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate").expect("write");
    let error = client_config(&empty).expect_err("empty").to_string();
    assert!(error.contains("holds no PEM certificate"), "{error}");
}
