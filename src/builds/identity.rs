//! The identity of a package set and the names derived from it.

use sha2::{Digest, Sha256};

/// On a KasprApp: any new value asks for a fresh resolution of an unchanged configuration.
pub const REFRESH_ANNOTATION: &str = "packages.kaspr.io/refresh";
/// On a pod template: the set its pods restore.
pub const SET_ANNOTATION: &str = crate::names::SET_ANNOTATION;
/// On build Jobs: the set they build.
pub const SET_LABEL: &str = "packages.kaspr.io/set";

const LOCK_CONFIG_MAP_SUFFIX: &str = "-python-packages-lock";
const JOB_INFIX: &str = "-packages-";
/// Kubernetes puts a Job's name in a label (`job-name`), so it must fit 63 characters.
const MAX_JOB_NAME: usize = 63;

/// 16 lowercase hex characters of SHA-256 over what decides a set's content: the app, its
/// install key (packages and indexes), the main image (the set is resolved against the image's
/// Python) and the refresh token. Every replica computes the same id without coordination.
pub fn set_id(namespace: &str, app: &str, install_key: &str, image: &str, refresh: &str) -> String {
    let mut digest = Sha256::new();
    for part in [
        "kaspr-packages-set/v1",
        namespace,
        app,
        install_key,
        image,
        refresh,
    ] {
        digest.update(part.as_bytes());
        digest.update([0u8]);
    }
    hex::encode(digest.finalize())[..16].to_owned()
}

/// `<app>-python-packages-lock`.
pub fn lock_config_map_name(app: &str) -> String {
    format!("{app}{LOCK_CONFIG_MAP_SUFFIX}")
}

/// `<app>-packages-<set id>`, the app's name cut (and its last character kept alphanumeric) so
/// the whole stays within 63 characters. The set id keeps it unique: it hashes the full name.
pub fn job_name(app: &str, set: &str) -> String {
    let room = MAX_JOB_NAME - JOB_INFIX.len() - set.len();
    let mut head: String = app.chars().take(room).collect();
    while head.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        head.pop();
    }
    format!("{head}{JOB_INFIX}{set}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[test]
    fn set_id_is_pinned_and_changes_with_each_input() {
        let base = set_id("ns", "app", "0123456789abcdef", "img:1", "");
        assert_eq!(base.len(), 16);
        assert!(
            base.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(base, set_id("ns", "app", "0123456789abcdef", "img:1", ""));
        let others = [
            set_id("ns2", "app", "0123456789abcdef", "img:1", ""),
            set_id("ns", "app2", "0123456789abcdef", "img:1", ""),
            set_id("ns", "app", "fedcba9876543210", "img:1", ""),
            set_id("ns", "app", "0123456789abcdef", "img:2", ""),
            set_id("ns", "app", "0123456789abcdef", "img:1", "2026-12-02"),
        ];
        for other in others {
            assert_ne!(other, base);
        }
        // The separator keeps fields apart: "a"+"bc" is not "ab"+"c".
        assert_ne!(
            set_id("a", "bc", "k", "i", ""),
            set_id("ab", "c", "k", "i", "")
        );
    }

    #[rstest]
    #[case::short("my-app", "my-app-packages-0123456789abcdef")]
    #[case::long_is_cut(&"a".repeat(80), &format!("{}-packages-0123456789abcdef", "a".repeat(37)))]
    #[case::cut_never_ends_on_a_dash(&format!("{}-b", "a".repeat(36)), &format!("{}-packages-0123456789abcdef", "a".repeat(36)))]
    fn job_names_fit_a_label(#[case] app: &str, #[case] expected: &str) {
        let name = job_name(app, "0123456789abcdef");
        assert_eq!(name, expected);
        assert!(name.len() <= 63);
    }
}
