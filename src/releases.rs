//! The Kubernetes releases this webhook is tested on, and how an API server's reported
//! version compares with them. `serve` logs one warning at start for a release outside the
//! range (and keeps serving); the chart's `kubeVersion` refuses clusters older than it.

use std::fmt;

/// The oldest and newest Kubernetes minor releases (of major 1) the end-to-end suite runs on.
pub const TESTED_MINORS: (u32, u32) = (35, 37);

/// How a reported release relates to the tested range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    Tested,
    /// Older than the oldest tested release.
    Older,
    /// Newer than the newest tested release.
    Newer,
    /// The version could not be read (reported as is).
    Unreadable(String),
}

/// A tested-range description for messages: `1.35–1.37`.
pub struct TestedRange;

impl fmt::Display for TestedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "1.{}-1.{}", TESTED_MINORS.0, TESTED_MINORS.1)
    }
}

/// Classifies the `major`/`minor` fields of the API server's `/version` answer. Providers
/// append to the minor (GKE reports `37+`), so only its leading digits count.
pub fn classify(major: &str, minor: &str) -> Support {
    let digits = |s: &str| -> Option<u32> {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        s[..end].parse().ok()
    };
    match (digits(major), digits(minor)) {
        (Some(1), Some(m)) if m < TESTED_MINORS.0 => Support::Older,
        (Some(1), Some(m)) if m > TESTED_MINORS.1 => Support::Newer,
        (Some(1), Some(_)) => Support::Tested,
        (Some(n), Some(_)) if n > 1 => Support::Newer,
        _ => Support::Unreadable(format!("major {major:?}, minor {minor:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::oldest("1", "35", Support::Tested)]
    #[case::newest("1", "37", Support::Tested)]
    #[case::provider_suffix("1", "36+", Support::Tested)]
    #[case::too_old("1", "34", Support::Older)]
    #[case::ancient_with_suffix("1", "27+", Support::Older)]
    #[case::too_new("1", "38", Support::Newer)]
    #[case::next_major("2", "0", Support::Newer)]
    fn classifies_reported_versions(
        #[case] major: &str,
        #[case] minor: &str,
        #[case] want: Support,
    ) {
        assert_eq!(classify(major, minor), want);
    }

    #[test]
    fn an_unreadable_version_is_reported_as_is() {
        assert_eq!(
            classify("", "x"),
            Support::Unreadable("major \"\", minor \"x\"".into())
        );
    }

    #[test]
    fn the_chart_refuses_what_is_older_than_the_tested_range() {
        let chart = include_str!("../charts/kaspr-packages-webhook/Chart.yaml");
        let line = chart
            .lines()
            .find(|l| l.starts_with("kubeVersion:"))
            .expect("Chart.yaml declares kubeVersion");
        assert_eq!(
            line,
            format!("kubeVersion: \">=1.{}.0-0\"", TESTED_MINORS.0),
            "Chart.yaml's kubeVersion and TESTED_MINORS must agree"
        );
    }

    #[test]
    fn the_range_reads_as_releases() {
        assert_eq!(TestedRange.to_string(), "1.35-1.37");
    }
}
