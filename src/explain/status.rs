//! The state of what the injection depends on at run time: the PVC cache (PVC mode) and the
//! init container of a pod.

use serde_json::Value;

use super::report::Lines;
use crate::controller::pvc::{COMPONENT, COMPONENT_LABEL, MANAGED_BY_LABEL};
use crate::names;
use crate::quantity;
use crate::spec::{PvcCache, pvc_name};

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

fn bytes(text: &str) -> Option<u64> {
    quantity::parse(text)
        .ok()
        .and_then(quantity::Quantity::to_bytes)
}

/// Lines about the PVC cache of `app` in PVC mode; `claim` is `None` when it does not exist.
/// `app_uid` is the KasprApp's uid, to tell whether the claim is owned by it.
pub fn claim(
    lines: &mut Lines,
    app: &str,
    app_uid: Option<&str>,
    cache: &PvcCache,
    claim: Option<&Value>,
) {
    let name = pvc_name(app);
    let Some(claim) = claim else {
        lines.problem(format!(
            "PVC {name} does not exist: pods stay Pending until the controller creates it \
             (is `serve` running with --controller-pvc, and does it watch this namespace?)"
        ));
        return;
    };
    if str_at(claim, "/metadata/deletionTimestamp").is_some() {
        lines.problem(format!(
            "PVC {name} is being deleted; the controller creates it again once it is gone"
        ));
        return;
    }
    let phase = str_at(claim, "/status/phase").unwrap_or("unknown");
    let class = str_at(claim, "/spec/storageClassName").unwrap_or("(cluster default)");
    let request = str_at(claim, "/spec/resources/requests/storage").unwrap_or("none");
    let capacity = str_at(claim, "/status/capacity/storage");
    let summary = format!(
        "PVC {name}: {phase}, storage class {class}, request {request}{}",
        capacity
            .map(|c| format!(", capacity {c}"))
            .unwrap_or_default()
    );
    if phase == "Bound" {
        lines.ok(summary);
    } else {
        lines.problem(format!(
            "{summary}: pods cannot start until it is bound (the storage class needs a \
             ReadWriteMany provisioner)"
        ));
    }
    let managed = str_at(
        claim,
        &format!("/metadata/labels/{}", pointer_key(MANAGED_BY_LABEL)),
    ) == Some("kaspr-packages-webhook")
        && str_at(
            claim,
            &format!("/metadata/labels/{}", pointer_key(COMPONENT_LABEL)),
        ) == Some(COMPONENT);
    if !managed {
        lines.info(format!(
            "PVC {name} was not created by kaspr-packages-webhook (no managed-by label): the controller never changes it"
        ));
    }
    match (bytes(&cache.size), bytes(request)) {
        (Some(wanted), Some(have)) if wanted > have => lines.info(format!(
            "PVC {name}: cache.size {} is larger than the request {request}; the controller grows it \
             (the storage class must allow volume expansion)",
            cache.size
        )),
        (Some(wanted), Some(have)) if wanted < have => lines.info(format!(
            "PVC {name}: cache.size {} is smaller than the request {request}; a claim cannot shrink \
             (recreate it by hand to make it smaller)",
            cache.size
        )),
        _ => {}
    }
    if let Some(wanted) = &cache.storage_class
        && str_at(claim, "/spec/storageClassName") != Some(wanted.as_str())
    {
        lines.info(format!(
            "PVC {name}: cache.storageClass is {wanted} but the claim uses {class}; the class of a \
             claim cannot change (recreate it by hand)"
        ));
    }
    let owned = claim
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|r| app_uid.is_some_and(|uid| str_at(r, "/uid") == Some(uid)));
    if managed && owned != cache.delete_claim {
        lines.info(format!(
            "PVC {name}: deleteClaim is {} but the claim is {}owned by the KasprApp yet; the controller \
             updates the owner reference",
            cache.delete_claim,
            if owned { "" } else { "not " }
        ));
    }
}

/// Image mode (docs/image-mode.md): no init container; the set's image is pulled by the
/// kubelet, so a pull failure shows on the containers. Returns whether the pod is in image mode.
fn image_mode(lines: &mut Lines, pod: &Value) -> bool {
    let Some(reference) = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|v| str_at(v, "/name") == Some(names::IMAGE_VOLUME))
        .and_then(|v| str_at(v, "/image/reference"))
    else {
        return false;
    };
    let failing: Vec<String> = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let reason = str_at(s, "/state/waiting/reason")?;
            matches!(reason, "ErrImagePull" | "ImagePullBackOff").then(|| {
                format!(
                    "container {}: {reason}: {}",
                    str_at(s, "/name").unwrap_or("?"),
                    str_at(s, "/state/waiting/message").unwrap_or("").trim()
                )
            })
        })
        .collect();
    if failing.is_empty() {
        lines.ok(format!(
            "image mode: packages are mounted read-only from {reference} (no init container)"
        ));
    } else {
        lines.problem(format!(
            "image mode: the pod waits for an image; its package set's image is {reference}: {}",
            failing.join("; ")
        ));
    }
    true
}

/// A label key inside a JSON pointer (`/` is escaped as `~1`).
fn pointer_key(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Lines about the injected init container of a pod: its state now and its last termination
/// message (the installer writes a one-line summary there).
pub fn init_container(lines: &mut Lines, pod: &Value) {
    if image_mode(lines, pod) {
        return;
    }
    let status = pod
        .pointer("/status/initContainerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|s| str_at(s, "/name") == Some(names::INIT_CONTAINER));
    let Some(status) = status else {
        lines.info(format!(
            "init container {}: no status yet (the pod is not running on a node yet)",
            names::INIT_CONTAINER
        ));
        return;
    };
    let restarts = status
        .get("restartCount")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let terminated = |key: &str| status.pointer(&format!("/{key}/terminated"));
    let describe = |t: &Value| {
        let code = t.get("exitCode").and_then(Value::as_i64).unwrap_or(-1);
        let reason = str_at(t, "/reason").unwrap_or("");
        let message = str_at(t, "/message").map(str::trim).unwrap_or("");
        let mut text = format!("exit code {code}");
        if !reason.is_empty() {
            text.push_str(&format!(" ({reason})"));
        }
        if !message.is_empty() {
            text.push_str(&format!(": {message}"));
        }
        (code, text)
    };
    let name = names::INIT_CONTAINER;
    if let Some(t) = terminated("state") {
        let (code, text) = describe(t);
        let allowed_failure = str_at(t, "/message").is_some_and(|m| m.contains(" FAILED "));
        if code == 0 && allowed_failure {
            lines.problem(format!(
                "init container {name}: the install failed and onFailure: allow let the app start \
                 without its packages, {text}"
            ));
        } else if code == 0 {
            lines.ok(format!("init container {name}: completed, {text}"));
        } else {
            lines.problem(format!("init container {name}: failed, {text}"));
        }
        return;
    }
    let last = terminated("lastState").map(describe);
    if let Some(waiting) = status.pointer("/state/waiting") {
        let reason = str_at(waiting, "/reason").unwrap_or("waiting");
        let message = str_at(waiting, "/message").unwrap_or("");
        let mut text = format!("init container {name}: waiting ({reason})");
        if !message.is_empty() {
            text.push_str(&format!(": {message}"));
        }
        if let Some((_, last)) = &last {
            text.push_str(&format!("; last attempt ({restarts} restarts): {last}"));
        }
        if last.is_some() || reason != "PodInitializing" {
            lines.problem(text);
        } else {
            lines.info(text);
        }
        return;
    }
    if status.pointer("/state/running").is_some() {
        let mut text = format!("init container {name}: installing (running)");
        if let Some((_, last)) = &last {
            text.push_str(&format!("; last attempt ({restarts} restarts): {last}"));
            lines.problem(text);
        } else {
            lines.info(text);
        }
        return;
    }
    lines.info(format!("init container {name}: no state reported yet"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::report::Severity;
    use serde_json::json;

    fn cache(size: &str, delete_claim: bool) -> PvcCache {
        PvcCache {
            storage_class: None,
            size: size.into(),
            delete_claim,
        }
    }

    fn bound_claim() -> Value {
        json!({"metadata": {"name": "demo-python-packages",
                "labels": {"app.kubernetes.io/managed-by": "kaspr-packages-webhook", "kaspr.io/component": "python-packages"},
                "ownerReferences": [{"uid": "app-uid", "kind": "KasprApp", "name": "demo"}]},
               "spec": {"storageClassName": "nfs", "resources": {"requests": {"storage": "256Mi"}}},
               "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}})
    }

    fn severities(lines: &Lines) -> Vec<Severity> {
        lines.0.iter().map(|l| l.severity).collect()
    }

    #[test]
    fn a_bound_managed_claim_is_ok() {
        let mut lines = Lines::default();
        claim(
            &mut lines,
            "demo",
            Some("app-uid"),
            &cache("256Mi", true),
            Some(&bound_claim()),
        );
        assert_eq!(severities(&lines), [Severity::Ok]);
        assert_eq!(
            lines.0[0].text,
            "PVC demo-python-packages: Bound, storage class nfs, request 256Mi, capacity 1Gi"
        );
    }

    #[test]
    fn a_missing_or_pending_claim_is_a_problem_and_a_pending_resize_is_said() {
        let mut lines = Lines::default();
        claim(
            &mut lines,
            "demo",
            Some("app-uid"),
            &cache("256Mi", true),
            None,
        );
        assert_eq!(severities(&lines), [Severity::Problem]);
        assert!(lines.0[0].text.contains("does not exist"));

        let mut pending = bound_claim();
        pending["status"] = json!({"phase": "Pending"});
        let mut lines = Lines::default();
        claim(
            &mut lines,
            "demo",
            Some("app-uid"),
            &cache("1Gi", false),
            Some(&pending),
        );
        assert_eq!(
            severities(&lines),
            [Severity::Problem, Severity::Info, Severity::Info]
        );
        assert!(lines.0[1].text.contains("grows it"), "{:?}", lines.0);
        assert!(
            lines.0[2].text.contains("deleteClaim is false"),
            "{:?}",
            lines.0
        );
    }

    fn pod(status: Value) -> Value {
        let statuses = vec![status];
        json!({"status": {"initContainerStatuses": statuses}})
    }

    #[test]
    fn an_image_mode_pod_names_its_image_and_a_pull_failure() {
        let reference = "registry.example/kaspr/packages@sha256:00aa";
        let mut image_pod = json!({"spec": {"volumes": [
            {"name": names::IMAGE_VOLUME, "image": {"reference": reference}}]},
            "status": {"containerStatuses": [{"name": "kaspr", "state": {"running": {}}}]}});
        let mut lines = Lines::default();
        init_container(&mut lines, &image_pod);
        assert_eq!(severities(&lines), [Severity::Ok]);
        assert!(lines.0[0].text.contains(reference), "{:?}", lines.0);
        image_pod["status"]["containerStatuses"][0]["state"] = json!({"waiting": {
            "reason": "ImagePullBackOff", "message": "Back-off pulling image: not found"}});
        let mut lines = Lines::default();
        init_container(&mut lines, &image_pod);
        assert_eq!(severities(&lines), [Severity::Problem]);
        assert!(
            lines.0[0]
                .text
                .contains("ImagePullBackOff: Back-off pulling image: not found")
                && lines.0[0].text.contains(reference),
            "{:?}",
            lines.0
        );
    }

    #[test]
    fn a_completed_install_is_ok_with_its_message() {
        let mut lines = Lines::default();
        init_container(
            &mut lines,
            &pod(json!({"name": "kaspr-packages", "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": "kaspr-packages: installed 1 package\n"}}})),
        );
        assert_eq!(severities(&lines), [Severity::Ok]);
        assert_eq!(
            lines.0[0].text,
            "init container kaspr-packages: completed, exit code 0 (Completed): kaspr-packages: installed 1 package"
        );
    }

    #[test]
    fn an_allowed_failure_is_a_problem_though_the_exit_code_is_0() {
        let mut lines = Lines::default();
        init_container(
            &mut lines,
            &pod(json!({"name": "kaspr-packages",
            "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                "message": "kaspr-packages: FAILED network: index down (onFailure=allow: the app starts without packages)"}}})),
        );
        assert_eq!(severities(&lines), [Severity::Problem]);
        assert!(
            lines.0[0].text.contains("onFailure: allow"),
            "{:?}",
            lines.0
        );
    }

    #[test]
    fn a_crash_loop_shows_the_last_termination_message() {
        let mut lines = Lines::default();
        init_container(
            &mut lines,
            &pod(json!({"name": "kaspr-packages", "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
            "lastState": {"terminated": {"exitCode": 11, "reason": "Error", "message": "package_not_found: nope==9"}}})),
        );
        assert_eq!(severities(&lines), [Severity::Problem]);
        assert_eq!(
            lines.0[0].text,
            "init container kaspr-packages: waiting (CrashLoopBackOff): back-off 40s; last attempt (3 restarts): exit code 11 (Error): package_not_found: nope==9"
        );
    }

    #[test]
    fn a_pod_not_started_yet_is_only_information() {
        let mut lines = Lines::default();
        init_container(&mut lines, &json!({"status": {"phase": "Pending"}}));
        init_container(
            &mut lines,
            &pod(
                json!({"name": "kaspr-packages", "state": {"waiting": {"reason": "PodInitializing"}}}),
            ),
        );
        init_container(
            &mut lines,
            &pod(json!({"name": "kaspr-packages", "state": {"running": {}}})),
        );
        assert_eq!(severities(&lines), [Severity::Info; 3]);
    }
}
