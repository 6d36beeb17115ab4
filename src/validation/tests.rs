use rstest::rstest;
use serde_json::json;

use super::*;
use crate::spec::{
    Cache, Credentials, DEFAULT_CACHE_SIZE, GcsCache, GcsKeySecret, InstallPolicy, PvcCache,
};

fn app(python_packages: Value) -> Value {
    let mut app = json!({
        "apiVersion": "kaspr.io/v1alpha1",
        "kind": "KasprApp",
        "metadata": {"name": "my-app", "namespace": "default"},
        "spec": {}
    });
    app["spec"]["pythonPackages"] = python_packages;
    app
}

fn errors(report: &Report) -> Vec<String> {
    report.errors.iter().map(ToString::to_string).collect()
}

#[test]
fn no_python_packages_is_valid_and_empty() {
    let report = validate_kasprapp(&json!({"spec": {}}));
    assert_eq!(report, Report::default());
}

#[test]
fn defaults_are_applied() {
    let report = validate_kasprapp(&app(json!({"packages": ["requests==2.31.0"]})));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let spec = report.spec.expect("spec");
    assert_eq!(spec.cache, Cache::EmptyDir);
    assert_eq!(spec.install_policy, InstallPolicy::default());
    assert_eq!(spec.index_url, None);
    assert!(spec.resources.is_none());
}

#[test]
fn pvc_defaults() {
    let report = validate_kasprapp(&app(
        json!({"packages": ["a==1"], "cache": {"enabled": true}}),
    ));
    assert_eq!(
        report.spec.expect("spec").cache,
        Cache::Pvc(PvcCache {
            storage_class: None,
            size: DEFAULT_CACHE_SIZE.into(),
            delete_claim: true
        })
    );
}

#[test]
fn gcs_defaults_and_prefix_slash() {
    let report = validate_kasprapp(&app(json!({
        "packages": ["a==1"],
        "cache": {"type": "gcs", "gcs": {"bucket": "my-bucket", "prefix": "pkgs", "secretRef": {"name": "gcs-key"}}}
    })));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        report.spec.expect("spec").cache,
        Cache::Gcs(GcsCache {
            bucket: "my-bucket".into(),
            prefix: "pkgs/".into(),
            max_archive_size: 1 << 30,
            key_secret: Some(GcsKeySecret {
                name: "gcs-key".into(),
                key: "sa.json".into()
            }),
        })
    );
}

#[test]
fn gcs_without_secret_uses_workload_identity() {
    let report = validate_kasprapp(&app(json!({
        "packages": ["a==1"], "cache": {"type": "gcs", "enabled": true, "gcs": {"bucket": "my-bucket"}}
    })));
    let Cache::Gcs(gcs) = report.spec.expect("spec").cache else {
        panic!("not gcs")
    };
    assert_eq!(gcs.key_secret, None);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.path == "spec.pythonPackages.cache.enabled")
    );
}

#[test]
fn reports_all_errors_at_once_with_paths() {
    let report = validate_kasprapp(&app(json!({
        "packages": ["requests==2.31.0", "--index-url=https://evil", "requests; rm -rf /"],
        "indexUrl": "ftp://example.com",
        "cache": {"type": "gcs", "gcs": {"bucket": "Bad_Bucket", "maxArchiveSize": "1GB"}},
        "installPolicy": {"retries": 50, "timeout": 5, "onFailure": "ignore"},
        "credentials": {"secretRef": {"usernameKey": "user name"}},
        "resources": {"requests": {"cpu": "lots"}}
    })));
    let errs = errors(&report);
    let expect = [
        "spec.pythonPackages.packages[1]: \"--index-url=https://evil\" is not a valid requirement: pip options are not allowed",
        "spec.pythonPackages.packages[2]: \"requests; rm -rf /\" is not a valid requirement",
        "spec.pythonPackages.indexUrl: \"ftp://example.com\" must be an http:// or https:// URL",
        "spec.pythonPackages.credentials.secretRef.name: is required",
        "spec.pythonPackages.credentials.secretRef.usernameKey: \"user name\" is not a valid Secret key",
        "spec.pythonPackages.cache.gcs.bucket: \"Bad_Bucket\" is not a valid GCS bucket name",
        "spec.pythonPackages.cache.gcs.maxArchiveSize: \"1GB\" is not a valid quantity",
        "spec.pythonPackages.installPolicy.retries: 50 is out of range (0..=20)",
        "spec.pythonPackages.installPolicy.timeout: 5 is out of range (60..=86400)",
        "spec.pythonPackages.installPolicy.onFailure: \"ignore\" is not a failure policy",
        "spec.pythonPackages.resources.requests.cpu: \"lots\" is not a valid quantity",
    ];
    for e in expect {
        assert!(
            errs.iter().any(|got| got.starts_with(e)),
            "missing {e:?} in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), expect.len(), "{errs:#?}");
    assert!(report.spec.is_none());
    let message = report.error_message("KasprApp my-app");
    assert_eq!(message.lines().count(), expect.len() + 1);
}

#[rstest]
#[case::packages_missing(json!({}), "spec.pythonPackages.packages: is required")]
#[case::packages_empty(json!({"packages": []}), "spec.pythonPackages.packages: must list at least one")]
#[case::packages_not_list(json!({"packages": "requests"}), "spec.pythonPackages.packages: must be a list")]
#[case::package_not_string(json!({"packages": [3]}), "spec.pythonPackages.packages[0]: must be a string")]
#[case::index_no_host(json!({"packages": ["a==1"], "indexUrl": "https://"}), "spec.pythonPackages.indexUrl")]
#[case::index_with_credentials(json!({"packages": ["a==1"], "indexUrl": "https://u:p@pypi.example.com/simple"}), "must not contain credentials")]
#[case::extra_index_bad(json!({"packages": ["a==1"], "extraIndexUrls": ["notaurl"]}), "spec.pythonPackages.extraIndexUrls[0]: \"notaurl\" is not a valid URL")]
#[case::trusted_host_bad(json!({"packages": ["a==1"], "trustedHosts": ["bad host"]}), "spec.pythonPackages.trustedHosts[0]")]
#[case::trusted_host_port_bad(json!({"packages": ["a==1"], "trustedHosts": ["host:99999"]}), "invalid port")]
#[case::credentials_without_ref(json!({"packages": ["a==1"], "credentials": {}}), "spec.pythonPackages.credentials.secretRef: is required")]
#[case::cache_type_bad(json!({"packages": ["a==1"], "cache": {"type": "s3"}}), "spec.pythonPackages.cache.type: \"s3\" is not a cache type")]
#[case::cache_enabled_not_bool(json!({"packages": ["a==1"], "cache": {"enabled": "yes"}}), "spec.pythonPackages.cache.enabled: must be true or false")]
#[case::access_mode(json!({"packages": ["a==1"], "cache": {"enabled": true, "accessMode": "ReadWriteOnce"}}), "only \"ReadWriteMany\"")]
#[case::size_bad(json!({"packages": ["a==1"], "cache": {"enabled": true, "size": "big"}}), "spec.pythonPackages.cache.size")]
#[case::size_zero(json!({"packages": ["a==1"], "cache": {"enabled": true, "size": "0"}}), "must be a positive size")]
#[case::storage_class_bad(json!({"packages": ["a==1"], "cache": {"enabled": true, "storageClass": "Fast SSD"}}), "not a valid StorageClass name")]
#[case::gcs_without_bucket(json!({"packages": ["a==1"], "cache": {"type": "gcs"}}), "spec.pythonPackages.cache.gcs.bucket: is required")]
#[case::gcs_secret_without_name(json!({"packages": ["a==1"], "cache": {"type": "gcs", "gcs": {"bucket": "abc", "secretRef": {}}}}), "spec.pythonPackages.cache.gcs.secretRef.name: is required")]
#[case::gcs_bucket_google(json!({"packages": ["a==1"], "cache": {"type": "gcs", "gcs": {"bucket": "goog-bucket"}}}), "not a valid GCS bucket name")]
#[case::retries_string(json!({"packages": ["a==1"], "installPolicy": {"retries": "3"}}), "spec.pythonPackages.installPolicy.retries: must be an integer")]
#[case::retries_negative(json!({"packages": ["a==1"], "installPolicy": {"retries": -1}}), "out of range")]
#[case::timeout_big(json!({"packages": ["a==1"], "installPolicy": {"timeout": 86401}}), "out of range")]
#[case::resources_unknown(json!({"packages": ["a==1"], "resources": {"limit": {}}}), "spec.pythonPackages.resources.limit")]
#[case::request_over_limit(json!({"packages": ["a==1"], "resources": {"requests": {"memory": "1Gi"}, "limits": {"memory": "512Mi"}}}), "is more than the limit")]
#[case::not_an_object(json!(["requests"]), "spec.pythonPackages: must be an object")]
fn rejects(#[case] packages: Value, #[case] expected: &str) {
    let report = validate_kasprapp(&app(packages));
    let errs = errors(&report);
    assert!(
        errs.iter().any(|e| e.contains(expected)),
        "{expected:?} not in {errs:#?}"
    );
    assert!(report.spec.is_none());
}

#[rstest]
#[case::unpinned(json!({"packages": ["requests"]}), "spec.pythonPackages.packages[0]", "not pinned")]
#[case::lower_bound(json!({"packages": ["pandas>=2.0.0"]}), "spec.pythonPackages.packages[0]", "not pinned")]
#[case::http_index(json!({"packages": ["a==1"], "indexUrl": "http://pypi.internal/simple"}), "spec.pythonPackages.indexUrl", "trustedHosts")]
#[case::credentials_without_index(json!({"packages": ["a==1"], "credentials": {"secretRef": {"name": "creds"}}}), "spec.pythonPackages.credentials", "indexUrl")]
#[case::allow(json!({"packages": ["a==1"], "installPolicy": {"onFailure": "allow"}}), "spec.pythonPackages.installPolicy.onFailure", "without its packages")]
#[case::credentials_over_http(json!({"packages": ["a==1"], "indexUrl": "http://pypi.internal/simple", "trustedHosts": ["pypi.internal"], "credentials": {"secretRef": {"name": "creds"}}}), "spec.pythonPackages.credentials", "clear text")]
#[case::unknown_field(json!({"packages": ["a==1"], "indexURL": "x"}), "spec.pythonPackages.indexURL", "unknown field")]
fn warns(#[case] packages: Value, #[case] path: &str, #[case] text: &str) {
    let report = validate_kasprapp(&app(packages));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.path == path && w.message.contains(text)),
        "{path} / {text:?} not in {:#?}",
        report.warnings
    );
}

#[test]
fn http_index_listed_in_trusted_hosts_does_not_warn() {
    let report = validate_kasprapp(&app(json!({
        "packages": ["a==1"], "indexUrl": "http://pypi.internal:8080/simple", "trustedHosts": ["pypi.internal:8080"]
    })));
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
}

#[test]
fn init_container_extras_are_read_and_checked() {
    let mut kasprapp = app(json!({"packages": ["a==1"]}));
    kasprapp["spec"]["template"] = json!({"pythonPackagesInitContainer": {
        "env": [
            {"name": "PIP_TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}},
            {"name": "GIT_SSH_COMMAND", "value": "ssh -i /etc/ssh-key/id -o StrictHostKeyChecking=yes"},
        ],
        "volumeMounts": [{"name": "ssh-key", "mountPath": "/etc/ssh-key", "readOnly": true}]
    }});
    let report = validate_kasprapp(&kasprapp);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let extras = report.spec.expect("spec").init_container;
    assert_eq!(extras.env.len(), 2);
    assert_eq!(extras.volume_mounts[0].mount_path, "/etc/ssh-key");

    kasprapp["spec"]["template"] = json!({"pythonPackagesInitContainer": {
        "env": [
            {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}, "fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "KASPR_PYPI_PASSWORD", "value": "x"},
            {"name": "B", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "volumeMounts": [{"name": "v", "mountPath": "/opt/kaspr/packages/site"}]
    }});
    let errs = errors(&validate_kasprapp(&kasprapp));
    for expected in [
        "spec.template.pythonPackagesInitContainer.env[0].valueFrom: must have exactly one of",
        "spec.template.pythonPackagesInitContainer.env[1].name: \"KASPR_PYPI_PASSWORD\" is set by",
        "spec.template.pythonPackagesInitContainer.env[2]: set either value or valueFrom",
        "spec.template.pythonPackagesInitContainer.volumeMounts[0].mountPath: \"/opt/kaspr/packages/site\" overlaps",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(expected)),
            "{expected:?} not in {errs:#?}"
        );
    }
}

#[test]
fn too_many_packages() {
    let packages: Vec<String> = (0..201).map(|i| format!("pkg{i}==1.0")).collect();
    let errs = errors(&validate_kasprapp(&app(json!({"packages": packages}))));
    assert!(errs.iter().any(|e| e.contains("at most 200")), "{errs:?}");
}

#[test]
fn secret_values_are_never_required() {
    // The validator never needs to read a Secret: a reference is enough.
    let report = validate_kasprapp(&app(json!({
        "packages": ["a==1"], "indexUrl": "https://pypi.example.com/simple",
        "credentials": {"secretRef": {"name": "pypi-creds", "usernameKey": "user", "passwordKey": "token"}}
    })));
    assert_eq!(
        report.spec.expect("spec").credentials,
        Some(Credentials {
            secret_name: "pypi-creds".into(),
            username_key: "user".into(),
            password_key: "token".into()
        })
    );
}

#[test]
fn only_declared_variables_may_be_expanded() {
    let mut kasprapp = app(json!({"packages": [
        "x @ https://other.example/${KASPR_PYPI_PASSWORD}.whl",
        "y @ https://pkgs.example.com/${UNDECLARED}/y-1.0.whl",
        "z @ https://${PIP_TOKEN}@pkgs.example.com/z-1.0.whl",
    ]}));
    kasprapp["spec"]["template"] = json!({"pythonPackagesInitContainer": {"env": [
        {"name": "PIP_TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}}
    ]}});
    let errs = errors(&validate_kasprapp(&kasprapp));
    assert_eq!(
        errs,
        [
            "spec.pythonPackages.packages[0]: ${KASPR_PYPI_PASSWORD} is kaspr-packages-webhook's own variable and is never expanded",
            "spec.pythonPackages.packages[1]: ${UNDECLARED} is not declared in spec.template.pythonPackagesInitContainer.env; only variables declared there are expanded",
        ]
    );
}
