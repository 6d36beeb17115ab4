//! The KasprApps of `examples/`, as the admission tests look them up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kaspr_packages_webhook::app::AppRef;
use serde_json::Value;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `examples/kasprapp-*.yaml`, by namespace (`default` when it names none) and name.
pub fn kasprapps() -> BTreeMap<AppRef, Arc<Value>> {
    let mut apps = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("examples")).expect("examples") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !name.starts_with("kasprapp-") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let app: Value = serde_yaml::from_str(&text).expect("yaml");
        let key = AppRef {
            namespace: app["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned(),
            name: app["metadata"]["name"].as_str().expect("name").to_owned(),
        };
        apps.insert(key, Arc::new(app));
    }
    apps
}
