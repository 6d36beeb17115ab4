//! Renders the injection into a StatefulSet's pod template or into a Pod.
//!
//! The object's JSON is edited in place, so fields unknown to our Kubernetes types survive. Every
//! mutation first strips what an earlier injection added (listed in the
//! `packages.kaspr.io/injected` annotation) and then injects again, so mutating an
//! already-mutated object, or the operator's rewrite of it, gives the same template byte for byte.
//! An UPDATE whose previous template holds the same app configuration rendered by another
//! rendering revision keeps that injection ([`revision`]).
//!
//! The spec handed in is already validated, and the caller diffs the result: the admission
//! path composes validate → [`apply`] → diff (see `admission::mutate`).

pub mod cache_access;
pub mod image;
pub mod record;
pub mod render;
pub mod revision;
pub mod takeover;

use serde_json::{Map, Value, json};

use crate::app::AppRef;
use crate::config::RenderConfig;
use crate::names;
use crate::spec::{OperatorPackages, PythonPackages};
use record::{Record, name_is};
pub use render::Injection;

/// A denial with its user-facing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub message: String,
    pub warnings: Vec<String>,
}

impl Denial {
    pub fn new(message: String) -> Self {
        Denial {
            message,
            warnings: Vec::new(),
        }
    }
}

/// The two kinds of object the injection goes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    StatefulSet,
    Pod,
}

impl ObjectKind {
    /// Where the pod template is in the object (a JSON pointer; `""` for a Pod itself).
    pub fn template_pointer(self) -> &'static str {
        match self {
            ObjectKind::StatefulSet => "/spec/template",
            ObjectKind::Pod => "",
        }
    }

    /// The PodSpec's field path, for messages.
    pub fn field_prefix(self) -> &'static str {
        match self {
            ObjectKind::StatefulSet => "spec.template.spec",
            ObjectKind::Pod => "spec",
        }
    }
}

/// A Pod created from an injected template carries our template hash and is left as it is.
pub fn pod_already_injected(pod: &Value) -> bool {
    pod.pointer("/metadata/annotations")
        .and_then(|a| a.get(names::TEMPLATE_HASH_ANNOTATION))
        .is_some()
}

/// Applies (or, with `spec` absent, removes) the injection on a pod template given as JSON
/// (`{metadata, spec}`). Returns warnings. `field_prefix` names the PodSpec in messages.
pub fn apply(
    template: &mut Value,
    spec: Option<&PythonPackages>,
    app: &AppRef,
    field_prefix: &str,
    config: &RenderConfig,
) -> Result<Vec<String>, Denial> {
    apply_set(template, spec, app, field_prefix, config, None)
}

/// [`apply`], with the pods restoring package `set` (builds on, see docs/builds.md).
pub fn apply_set(
    template: &mut Value,
    spec: Option<&PythonPackages>,
    app: &AppRef,
    field_prefix: &str,
    config: &RenderConfig,
    set: Option<&crate::builds::render::PackageSet>,
) -> Result<Vec<String>, Denial> {
    apply_keeping(template, None, spec, app, field_prefix, config, set)
}

/// [`apply_set`] for an object that replaces `previous` (the pod template before an UPDATE, or
/// the one stored): when `previous` carries an injection of the same app configuration (same
/// config hash) rendered by another revision, that injection is kept byte for byte instead of
/// this revision's (see [`revision::keep`] and docs/revisions.md).
pub fn apply_keeping(
    template: &mut Value,
    previous: Option<&Value>,
    spec: Option<&PythonPackages>,
    app: &AppRef,
    field_prefix: &str,
    config: &RenderConfig,
    set: Option<&crate::builds::render::PackageSet>,
) -> Result<Vec<String>, Denial> {
    let warnings = render_into(template, spec, app, field_prefix, config, set)?;
    if let (Some(previous), Some(template)) = (previous, template.as_object_mut()) {
        revision::keep(template, previous);
    }
    Ok(warnings)
}

fn render_into(
    template: &mut Value,
    spec: Option<&PythonPackages>,
    app: &AppRef,
    field_prefix: &str,
    config: &RenderConfig,
    set: Option<&crate::builds::render::PackageSet>,
) -> Result<Vec<String>, Denial> {
    let Some(template) = template.as_object_mut() else {
        return Ok(Vec::new());
    };
    let (record, foreign) = Record::read(template.get("metadata")).sanitized();
    let mut warnings: Vec<String> = foreign
        .iter()
        .map(|entry| {
            format!(
                "{field_prefix}: the {} annotation lists {entry}, which kaspr-packages-webhook never adds; it was left alone",
                names::INJECTED_ANNOTATION
            )
        })
        .collect();
    let Some(pod_spec) = template.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(warnings);
    };
    let disguise = match operator_stance(pod_spec, &record, spec, config, field_prefix) {
        Stance::LeaveAlone(warning) => {
            warnings.push(warning);
            return Ok(warnings);
        }
        Stance::Inject(disguise) => disguise,
    };

    record::strip(pod_spec, &record);
    let Some(spec) = spec else {
        remove_annotations(template);
        return Ok(warnings);
    };

    let main_index = main_container_index(pod_spec).ok_or_else(|| {
        Denial::new(format!(
            "{field_prefix}.containers: the pod has no containers"
        ))
    })?;
    let mut main_context_set = false;
    if disguise.is_some() {
        takeover::strip_operator(pod_spec, &app.name, main_index);
        main_context_set = set_main_security_context(pod_spec, main_index, spec);
    }
    check_collisions(pod_spec, field_prefix)?;
    check_extra_mounts(pod_spec, spec, field_prefix)?;
    let main = main_container(pod_spec, main_index, field_prefix)?;
    let main_image = main
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let target = image::MainContainer {
        index: main_index,
        name: main
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        security_context_set: main_context_set,
        path: format!("{field_prefix}.containers[{main_index}]"),
    };
    match image::decide(
        set,
        main_image,
        &config.image_mode,
        disguise.is_some(),
        field_prefix,
    ) {
        image::Decision::Mount(published) => {
            warnings.extend(image::apply_mount(
                template, &published, spec, set, config, target,
            ));
            return Ok(warnings);
        }
        image::Decision::Fallback(warning) => warnings.push(warning),
        image::Decision::NotAsked => {}
    }
    let injection = render::render(spec, app, &main, pod_spec, config, disguise.as_ref(), set);
    warnings.extend(cache_access::warnings(
        spec,
        app,
        &main,
        pod_spec,
        field_prefix,
    ));
    warnings.extend(inject(template, &injection, target));
    Ok(warnings)
}

/// Whether to inject next to what the Kaspr operator put into the pod.
enum Stance {
    /// The operator installs the packages itself and the app respects it: this warning only.
    LeaveAlone(String),
    /// Inject, disguised as the operator's installer when it installed or we took over.
    Inject(Option<render::Disguise>),
}

fn operator_stance(
    pod_spec: &Map<String, Value>,
    record: &Record,
    spec: Option<&PythonPackages>,
    config: &RenderConfig,
    field_prefix: &str,
) -> Stance {
    let mode = spec
        .and_then(|s| s.operator_packages)
        .unwrap_or(config.operator_packages);
    let operator_installs = takeover::operator_installs(pod_spec);
    let taken_over = record
        .init_containers
        .iter()
        .any(|n| n == names::OPERATOR_INIT_CONTAINER);
    if spec.is_some() && operator_installs && mode == OperatorPackages::Respect {
        return Stance::LeaveAlone(format!(
            "{field_prefix}.initContainers: the pod already has an init container named \
             {:?} (the Kaspr operator's own package installer); kaspr-packages-webhook did not \
             inject (annotation {} or the chart's operatorPackages selects takeover)",
            names::OPERATOR_INIT_CONTAINER,
            names::OPERATOR_PACKAGES_ANNOTATION,
        ));
    }
    // Under takeover the install container keeps the operator's name and PACKAGES_HASH; when the
    // app went back to respect, a hash the operator never renders makes it put its own back.
    Stance::Inject((operator_installs || taken_over).then(|| render::Disguise {
        packages_hash: match mode {
            OperatorPackages::Takeover => {
                takeover::packages_hash(pod_spec, main_container_index(pod_spec))
            }
            OperatorPackages::Respect => {
                Some(json!({"name": names::OPERATOR_HASH_ENV, "value": takeover::RELEASED_HASH}))
            }
        },
    }))
}

/// The main container, which must name an image: the installer runs with it.
fn main_container(
    pod_spec: &Map<String, Value>,
    main_index: usize,
    field_prefix: &str,
) -> Result<Map<String, Value>, Denial> {
    let main = list(pod_spec, "containers")[main_index]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if main
        .get("image")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(Denial::new(format!(
            "{field_prefix}.containers[{main_index}].image: the main container has no image to run the installer with"
        )));
    }
    Ok(main)
}

/// Puts a rendered injection into the template (init container, volumes, the main
/// container's mounts and PYTHONPATH) and records it in the annotations. Returns warnings.
fn inject(
    template: &mut Map<String, Value>,
    injection: &Injection,
    main: image::MainContainer,
) -> Vec<String> {
    let Some(pod_spec) = template.get_mut("spec").and_then(Value::as_object_mut) else {
        return Vec::new();
    };
    push(pod_spec, "initContainers", injection.init_container.clone());
    for volume in &injection.volumes {
        push(pod_spec, "volumes", volume.clone());
    }
    let (mount_names, pythonpath_warning) =
        inject_main_container(pod_spec, main.index, injection, &main.path);
    let init_name = injection
        .init_container
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or(names::INIT_CONTAINER)
        .to_owned();
    let record = Record {
        init_containers: vec![init_name],
        volumes: injection
            .volumes
            .iter()
            .filter_map(|v| v.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect(),
        container: main.name,
        volume_mounts: mount_names,
        env: vec![names::PYTHONPATH.to_owned()],
        security_context: main.security_context_set,
        image_pull_secrets: Vec::new(),
    };
    write_annotations(template, injection, &record);
    pythonpath_warning.into_iter().collect()
}

/// Under takeover, gives the main container the securityContext the KasprApp declares for it
/// (`spec.template.kasprContainer.securityContext`, which the operator drops), unless it has
/// one already. Returns whether it was set.
fn set_main_security_context(
    pod_spec: &mut Map<String, Value>,
    main_index: usize,
    spec: &PythonPackages,
) -> bool {
    let Some(declared) = &spec.main_security_context else {
        return false;
    };
    let Some(main) = pod_spec
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .and_then(|c| c.get_mut(main_index))
        .and_then(Value::as_object_mut)
    else {
        return false;
    };
    if main.get("securityContext").is_some_and(|c| !c.is_null()) {
        return false;
    }
    main.insert("securityContext".into(), Value::Object(declared.clone()));
    true
}

/// The template hash, the install key and the record of what was injected.
fn write_annotations(template: &mut Map<String, Value>, injection: &Injection, record: &Record) {
    let metadata = template.entry("metadata").or_insert_with(|| json!({}));
    let Some(metadata) = metadata.as_object_mut() else {
        return;
    };
    let annotations = metadata.entry("annotations").or_insert_with(|| json!({}));
    if let Some(annotations) = annotations.as_object_mut() {
        annotations.insert(
            names::TEMPLATE_HASH_ANNOTATION.into(),
            json!(injection.template_hash),
        );
        annotations.insert(
            names::INSTALL_KEY_ANNOTATION.into(),
            json!(injection.install_key),
        );
        annotations.insert(
            names::INJECTED_ANNOTATION.into(),
            json!(record.to_annotation()),
        );
        match &injection.set {
            Some(set) => annotations.insert(names::SET_ANNOTATION.into(), json!(set)),
            None => annotations.remove(names::SET_ANNOTATION),
        };
        annotations.insert(names::REVISION_ANNOTATION.into(), json!(injection.revision));
        annotations.insert(
            names::CONFIG_HASH_ANNOTATION.into(),
            json!(injection.config_hash),
        );
    }
}

/// Mounts our volumes into the main container and puts our site directory on its PYTHONPATH.
/// Returns the names of the mounts added and a PYTHONPATH warning, if any.
fn inject_main_container(
    pod_spec: &mut Map<String, Value>,
    main_index: usize,
    injection: &Injection,
    path: &str,
) -> (Vec<String>, Option<String>) {
    let Some(main) = pod_spec
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .and_then(|c| c.get_mut(main_index))
        .and_then(Value::as_object_mut)
    else {
        return (Vec::new(), None);
    };
    let mut mount_names = Vec::new();
    for m in &injection.main_mounts {
        push(main, "volumeMounts", m.clone());
        if let Some(n) = m.get("name").and_then(Value::as_str) {
            mount_names.push(n.to_owned());
        }
    }
    (mount_names, set_pythonpath(main, path))
}

/// Removes our annotations; an annotation map left empty is removed too (the injection
/// created it).
fn remove_annotations(template: &mut Map<String, Value>) {
    let Some(metadata) = template.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let now_empty = match metadata
        .get_mut("annotations")
        .and_then(Value::as_object_mut)
    {
        Some(annotations) => {
            let removed = names::ANNOTATIONS
                .iter()
                .filter(|key| annotations.remove(**key).is_some())
                .count();
            let had_ours = removed > 0;
            had_ours && annotations.is_empty()
        }
        None => false,
    };
    if now_empty {
        metadata.remove("annotations");
    }
}

fn list<'a>(map: &'a Map<String, Value>, key: &str) -> &'a [Value] {
    map.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn push(map: &mut Map<String, Value>, key: &str, item: Value) {
    match map.get_mut(key) {
        Some(Value::Array(items)) => items.push(item),
        _ => {
            map.insert(key.to_owned(), Value::Array(vec![item]));
        }
    }
}

/// The main container: the one named `kaspr`, else the first.
pub fn main_container_index(pod_spec: &Map<String, Value>) -> Option<usize> {
    let containers = list(pod_spec, "containers");
    if containers.is_empty() {
        return None;
    }
    Some(
        containers
            .iter()
            .position(|c| name_is(c, names::MAIN_CONTAINER))
            .unwrap_or(0),
    )
}

/// After stripping our own additions, any of our names still present belongs to someone else.
fn check_collisions(pod_spec: &Map<String, Value>, prefix: &str) -> Result<(), Denial> {
    let mut problems = Vec::new();
    for (i, c) in list(pod_spec, "initContainers").iter().enumerate() {
        if name_is(c, names::INIT_CONTAINER) {
            problems.push(format!(
                "{prefix}.initContainers[{i}]: an init container named {:?} exists and was not added by kaspr-packages-webhook",
                names::INIT_CONTAINER
            ));
        }
    }
    for (i, v) in list(pod_spec, "volumes").iter().enumerate() {
        if let Some(name) = names::VOLUMES.iter().find(|n| name_is(v, n)) {
            problems.push(format!(
                "{prefix}.volumes[{i}]: a volume named {name:?} exists and was not added by kaspr-packages-webhook"
            ));
        }
    }
    if let Some(main) = main_container_index(pod_spec) {
        let container = &list(pod_spec, "containers")[main];
        let mounts = container
            .get("volumeMounts")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        for (i, m) in mounts.iter().enumerate() {
            let path = m
                .get("mountPath")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let path = path.trim_end_matches('/');
            let ours = [names::PACKAGES_PATH, names::CACHE_PATH]
                .iter()
                .any(|p| path == *p || path.starts_with(&format!("{p}/")));
            if ours || names::VOLUMES.iter().any(|n| name_is(m, n)) {
                problems.push(format!(
                    "{prefix}.containers[{main}].volumeMounts[{i}]: {path:?} is used by kaspr-packages-webhook and was not added by it"
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Denial::new(format!(
            "kaspr-packages-webhook cannot inject because names it uses are taken (rename them):\n  {}",
            problems.join("\n  ")
        )))
    }
}

/// `pythonPackagesInitContainer.volumeMounts` must name volumes the pod declares.
fn check_extra_mounts(
    pod_spec: &Map<String, Value>,
    spec: &PythonPackages,
    prefix: &str,
) -> Result<(), Denial> {
    let volumes = list(pod_spec, "volumes");
    let missing: Vec<String> = spec
        .init_container
        .volume_mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| !volumes.iter().any(|v| name_is(v, &m.name)))
        .map(|(i, m)| {
            format!(
                "spec.template.pythonPackagesInitContainer.volumeMounts[{i}]: volume {:?} is not declared in {prefix}.volumes",
                m.name
            )
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Denial::new(missing.join("\n")))
    }
}

/// Puts our site directory first on the main container's PYTHONPATH, keeping any value it had,
/// and never leaving an empty entry (Python reads one as the working directory). Returns a
/// warning when the earlier value cannot be seen here.
fn set_pythonpath(container: &mut Map<String, Value>, container_path: &str) -> Option<String> {
    let site = names::SITE_PATH;
    let env = container
        .entry("env")
        .or_insert_with(|| Value::Array(Vec::new()));
    let env = env.as_array_mut()?;
    let ours = json!({"name": names::PYTHONPATH, "value": site});
    let existing = env.iter_mut().rev().find(|e| name_is(e, names::PYTHONPATH));
    match existing {
        None => env.push(ours),
        Some(entry) if entry.get("valueFrom").is_some_and(|v| !v.is_null()) => {
            // The value comes from a Secret/ConfigMap/field: chain to it with $(PYTHONPATH),
            // which the kubelet expands from the earlier entry. Its content is not visible
            // here, so an empty value would leave a trailing ':'; say so.
            env.push(json!({"name": names::PYTHONPATH, "value": format!("{site}:$({})", names::PYTHONPATH)}));
            return Some(format!(
                "{container_path}.env: PYTHONPATH comes from valueFrom and is chained as \
                 {site}:$(PYTHONPATH); if that value can be empty, the container's working \
                 directory lands on sys.path: keep it non-empty or set PYTHONPATH as a plain value"
            ));
        }
        Some(entry) => {
            let old = entry
                .get("value")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if old.split(':').all(str::is_empty) {
                // Nothing to keep: our own entry after it wins, and removal leaves theirs as it was.
                env.push(ours);
            } else {
                entry["value"] = json!(format!("{site}:{old}"));
                if old.split(':').any(str::is_empty) {
                    return Some(format!(
                        "{container_path}.env: PYTHONPATH {old:?} has an empty entry, which puts \
                         the container's working directory on sys.path"
                    ));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
