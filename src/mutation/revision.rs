//! Rendering revisions: which injection a StatefulSet keeps when another webhook rendering
//! answers for it.
//!
//! Everything in an injection that does not come from the app's own configuration (the
//! installer program, the chart-level init-container resources and emptyDir size limit) belongs
//! to a named revision (`packages.kaspr.io/revision`). The injection also records its config
//! hash (`packages.kaspr.io/config-hash`): the hash of what would be rendered with every
//! revision-owned setting left out. Two renderings of the same app configuration by different
//! revisions have the same config hash and different bytes.
//!
//! On an UPDATE (an operator rewrite, a scale), [`keep`] puts the previous template's injection
//! back byte for byte when its config hash is the one just rendered: the app stays on the
//! revision it was rendered with, whichever webhook answers, and only a change of its own
//! configuration moves it, or the controller's mark on the StatefulSet ([`marked_for`]). The
//! controller asks the same question of the stored template, so a
//! StatefulSet of another revision is in sync and nobody rewrites it.

use serde_json::{Map, Value};

use super::record::{self, Record, name_is};
use crate::names;

fn annotations(metadata: Option<&Value>) -> Option<&Map<String, Value>> {
    metadata?.get("annotations")?.as_object()
}

fn annotation<'a>(metadata: Option<&'a Value>, key: &str) -> Option<&'a str> {
    annotations(metadata)?.get(key)?.as_str()
}

/// The annotations a kept injection takes from the previous template (the config hash is
/// already the same).
const KEPT_ANNOTATIONS: &[&str] = &[
    names::TEMPLATE_HASH_ANNOTATION,
    names::INSTALL_KEY_ANNOTATION,
    names::INJECTED_ANNOTATION,
    names::SET_ANNOTATION,
    names::REVISION_ANNOTATION,
];

/// The revision a pod template's injection was rendered with, if it records one.
pub fn revision_of(template: &Value) -> Option<&str> {
    annotation(template.get("metadata"), names::REVISION_ANNOTATION)
}

/// Whether `object` (a StatefulSet) carries the controller's mark to move to `revision` on its
/// own metadata: then the webhook of that revision renders its own injection instead of keeping
/// the previous one (docs/revisions.md, "Moving apps to a new revision").
pub fn marked_for(object: &Value, revision: &str) -> bool {
    annotation(object.get("metadata"), names::MARK_ANNOTATION) == Some(revision)
}

/// The config hash a pod template's injection records, if any.
pub fn config_hash_of(template: &Value) -> Option<&str> {
    annotation(template.get("metadata"), names::CONFIG_HASH_ANNOTATION)
}

/// After `template` was rendered by this revision: when `previous` carries an injection of
/// another revision with the same config hash, complete and of our shape, puts that injection
/// (init container, volumes, mounts and annotations) in place of the one just rendered.
/// Returns whether it did; anything missing or unexpected leaves `template` as rendered.
pub fn keep(template: &mut Map<String, Value>, previous: &Value) -> bool {
    let Some(kept) = kept(template, previous) else {
        return false;
    };
    *template = kept;
    true
}

fn kept(template: &Map<String, Value>, previous: &Value) -> Option<Map<String, Value>> {
    let ours = template.get("metadata");
    let theirs = previous.get("metadata");
    let config_hash = annotation(ours, names::CONFIG_HASH_ANNOTATION)?;
    let their_revision = annotation(theirs, names::REVISION_ANNOTATION)?;
    if annotation(theirs, names::CONFIG_HASH_ANNOTATION) != Some(config_hash)
        || annotation(ours, names::REVISION_ANNOTATION) == Some(their_revision)
    {
        return None;
    }
    let (record, foreign) = Record::read(theirs).sanitized();
    if !foreign.is_empty() || record != Record::read(ours) || !record.present_in(previous) {
        return None;
    }

    let their_spec = previous.get("spec");
    let pick = |key: &str, name: &str, ours: fn(&Value) -> bool| -> Option<Value> {
        list(their_spec, key)
            .iter()
            .find(|item| name_is(item, name) && ours(item))
            .cloned()
    };
    let init_containers = record
        .init_containers
        .iter()
        .map(|n| pick("initContainers", n, record::is_our_init_container))
        .collect::<Option<Vec<_>>>()?;
    let volumes = record
        .volumes
        .iter()
        .map(|n| pick("volumes", n, record::is_our_volume))
        .collect::<Option<Vec<_>>>()?;
    let their_container = list(their_spec, "containers")
        .iter()
        .find(|c| name_is(c, &record.container));
    let mounts = record
        .volume_mounts
        .iter()
        .map(|n| {
            list(their_container, "volumeMounts")
                .iter()
                .find(|m| name_is(m, n) && record::is_our_mount(m))
                .cloned()
        })
        .collect::<Option<Vec<_>>>()?;

    let mut kept = template.clone();
    let spec = kept.get_mut("spec")?.as_object_mut()?;
    replace_all(spec, "initContainers", init_containers)?;
    replace_all(spec, "volumes", volumes)?;
    let container = spec
        .get_mut("containers")?
        .as_array_mut()?
        .iter_mut()
        .find(|c| name_is(c, &record.container))?
        .as_object_mut()?;
    replace_all(container, "volumeMounts", mounts)?;

    let their_annotations = annotations(theirs)?;
    let our_annotations = kept
        .get_mut("metadata")?
        .get_mut("annotations")?
        .as_object_mut()?;
    for key in KEPT_ANNOTATIONS {
        match their_annotations.get(*key) {
            Some(value) => our_annotations.insert((*key).to_owned(), value.clone()),
            None => our_annotations.remove(*key),
        };
    }
    Some(kept)
}

/// Replaces, in the list at `key`, each item by the one of the same name from `items`; `None`
/// when one has no counterpart.
fn replace_all(map: &mut Map<String, Value>, key: &str, items: Vec<Value>) -> Option<()> {
    let list = map.get_mut(key)?.as_array_mut()?;
    for item in items {
        let name = item.get("name")?.as_str()?.to_owned();
        let slot = list.iter_mut().find(|existing| name_is(existing, &name))?;
        *slot = item;
    }
    Some(())
}

fn list<'a>(value: Option<&'a Value>, key: &str) -> &'a [Value] {
    value
        .and_then(|v| v.get(key))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

#[cfg(test)]
mod tests;
