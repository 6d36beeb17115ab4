//! What a finished build reports: the installer's summary (termination message) and the lock
//! it printed into its log, gzip + base64 between marker lines (see docs/installer.md).

use std::io::Read as _;

use base64::Engine as _;
use sha2::{Digest, Sha256};

const PREFIX: &str = "kaspr-packages:";
/// The longest message kept from a failure (Events and the ConfigMap stay readable).
const MAX_MESSAGE: usize = 600;

/// `(category, message)` of a failed build from its termination message; `unknown` when the
/// message is missing or not the installer's (a pod killed by its deadline, say).
pub fn failure(termination: Option<&str>) -> (String, String) {
    let line = termination
        .unwrap_or("")
        .lines()
        .rev()
        .find(|l| l.starts_with(PREFIX))
        .unwrap_or("");
    let parsed = line
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.trim_start().strip_prefix("FAILED "))
        .and_then(|rest| rest.split_once(": "))
        .filter(|(category, _)| {
            !category.is_empty() && category.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        });
    match parsed {
        Some((category, message)) => (category.to_owned(), shorten(message.trim())),
        None => {
            let text = termination.unwrap_or("").trim();
            let message = if text.is_empty() {
                "the build Job failed without a message from the installer (deadline exceeded, evicted, or the image has no python3)".to_owned()
            } else {
                shorten(text.lines().last().unwrap_or(text))
            };
            ("unknown".to_owned(), message)
        }
    }
}

fn shorten(text: &str) -> String {
    if text.chars().count() <= MAX_MESSAGE {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(MAX_MESSAGE - 3).collect();
    cut.push_str("...");
    cut
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LockError {
    #[error("the build's log holds no complete lock (no LOCK BEGIN ... LOCK END lines)")]
    Missing,
    #[error("the lock in the build's log cannot be decoded: {0}")]
    Undecodable(String),
    #[error("the lock in the build's log has sha256 {actual}, its header says {stated}")]
    Mismatch { stated: String, actual: String },
}

/// The lock printed in a build pod's log, checked against the sha256 on its BEGIN line.
/// The last complete block wins (a log holds one build).
pub fn lock_from_log(log: &str) -> Result<String, LockError> {
    let begin = format!("{PREFIX} LOCK BEGIN sha256 ");
    let end = format!("{PREFIX} LOCK END");
    let chunk = format!("{PREFIX} LOCK ");
    let mut found = None;
    let mut open: Option<(String, String)> = None;
    for line in log.lines() {
        let line = line.trim_end();
        if let Some(digest) = line.strip_prefix(&begin) {
            open = Some((digest.trim().to_owned(), String::new()));
        } else if line == end {
            if let Some(block) = open.take() {
                found = Some(block);
            }
        } else if let Some(data) = line.strip_prefix(&chunk)
            && let Some((_, blob)) = open.as_mut()
        {
            blob.push_str(data);
        }
    }
    let (stated, blob) = found.ok_or(LockError::Missing)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(blob.as_bytes())
        .map_err(|e| LockError::Undecodable(e.to_string()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes.as_slice())
        .take(4 << 20)
        .read_to_string(&mut text)
        .map_err(|e| LockError::Undecodable(e.to_string()))?;
    let actual = hex::encode(Sha256::digest(text.as_bytes()));
    if actual != stated {
        return Err(LockError::Mismatch { stated, actual });
    }
    Ok(text)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rstest::rstest;
    use std::io::Write as _;

    /// A log as the installer prints it (the same encoding: gzip, base64, 76 per line).
    pub fn printed(lock: &str) -> String {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(lock.as_bytes()).expect("gzip");
        let blob = base64::engine::general_purpose::STANDARD.encode(gz.finish().expect("gzip"));
        let mut out = format!(
            "kaspr-packages: locked 1 distributions\nkaspr-packages: LOCK BEGIN sha256 {}\n",
            hex::encode(Sha256::digest(lock.as_bytes()))
        );
        for piece in blob.as_bytes().chunks(76) {
            out.push_str(&format!(
                "kaspr-packages: LOCK {}\n",
                std::str::from_utf8(piece).expect("ascii")
            ));
        }
        out.push_str("kaspr-packages: LOCK END\nkaspr-packages: OK 1 packages\n");
        out
    }

    #[test]
    fn reads_the_printed_lock() {
        let lock = "lock-version = \"1.0\"\n".repeat(200);
        assert_eq!(lock_from_log(&printed(&lock)), Ok(lock));
    }

    #[test]
    fn refuses_a_lock_whose_digest_differs() {
        let log = printed("lock-version = \"1.0\"\n").replace("sha256 ", "sha256 00");
        assert!(matches!(
            lock_from_log(&log),
            Err(LockError::Mismatch { .. })
        ));
    }

    #[rstest]
    #[case::no_lock("kaspr-packages: OK\n")]
    #[case::unfinished("kaspr-packages: LOCK BEGIN sha256 ab\nkaspr-packages: LOCK H4sI\n")]
    fn missing_lock(#[case] log: &str) {
        assert_eq!(lock_from_log(log), Err(LockError::Missing));
    }

    #[test]
    fn garbage_is_undecodable_not_a_panic() {
        let log = "kaspr-packages: LOCK BEGIN sha256 ab\nkaspr-packages: LOCK !!!\nkaspr-packages: LOCK END\n";
        assert!(matches!(lock_from_log(log), Err(LockError::Undecodable(_))));
    }

    #[rstest]
    #[case::installer_line(
        Some(
            "kaspr-packages: FAILED authentication: index http://i/simple/ answered HTTP 401 for a\n"
        ),
        "authentication",
        "index http://i/simple/ answered HTTP 401 for a"
    )]
    #[case::allow_suffix_kept(
        Some(
            "kaspr-packages: FAILED network: down (onFailure=allow: the app starts without packages)"
        ),
        "network",
        "down (onFailure=allow: the app starts without packages)"
    )]
    #[case::no_message(
        None,
        "unknown",
        "the build Job failed without a message from the installer (deadline exceeded, evicted, or the image has no python3)"
    )]
    #[case::foreign_text(Some("python3: not found"), "unknown", "python3: not found")]
    fn failure_category_and_message(
        #[case] termination: Option<&str>,
        #[case] category: &str,
        #[case] message: &str,
    ) {
        assert_eq!(
            failure(termination),
            (category.to_owned(), message.to_owned())
        );
    }
}
