//! Publishing the serving pair as files, the way the kubelet publishes a Secret volume: each
//! version in its own directory, a `..data` symlink swapped atomically, and stable names that
//! point through it. A reader that opens `tls.crt` and then `tls.key` around a swap sees the
//! chain change and reads again (see `server::tls`), so it never pairs an old certificate with
//! a new key.

use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

const DATA_LINK: &str = "..data";

/// Writes `files` (name, content, mode) into `dir` unless it already serves exactly them.
/// Returns whether anything changed.
pub fn publish(dir: &Path, files: &[(&str, &[u8], u32)]) -> io::Result<bool> {
    let unchanged = files.iter().all(|(name, content, _)| {
        std::fs::read(dir.join(name)).is_ok_and(|current| current == *content)
    });
    if unchanged {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let previous = std::fs::read_link(dir.join(DATA_LINK)).ok();

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let version = format!("..{nanos}");
    let version_dir = dir.join(&version);
    std::fs::create_dir(&version_dir)?;
    for (name, content, mode) in files {
        let path = version_dir.join(name);
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
    }
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    symlink(&version, &tmp_link)?;
    std::fs::rename(&tmp_link, dir.join(DATA_LINK))?;

    for (name, _, _) in files {
        let path = dir.join(name);
        let target = Path::new(DATA_LINK).join(name);
        if std::fs::read_link(&path).ok().as_deref() != Some(target.as_path()) {
            let tmp = dir.join(format!("..{name}.tmp"));
            let _ = std::fs::remove_file(&tmp);
            symlink(&target, &tmp)?;
            std::fs::rename(&tmp, &path)?;
        }
    }
    if let Some(previous) = previous
        && previous.as_os_str() != version.as_str()
        && previous.components().count() == 1
    {
        // Readers that opened the old files keep them; the names now point at the new version.
        let _ = std::fs::remove_dir_all(dir.join(previous));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_swaps_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("certs");
        assert!(
            publish(
                &out,
                &[("tls.crt", b"one", 0o644), ("tls.key", b"k1", 0o600)]
            )
            .expect("write")
        );
        assert!(
            !publish(
                &out,
                &[("tls.crt", b"one", 0o644), ("tls.key", b"k1", 0o600)]
            )
            .expect("same")
        );
        assert!(
            publish(
                &out,
                &[("tls.crt", b"two", 0o644), ("tls.key", b"k2", 0o600)]
            )
            .expect("swap")
        );
        assert_eq!(std::fs::read(out.join("tls.crt")).expect("read"), b"two");
        assert_eq!(std::fs::read(out.join("tls.key")).expect("read"), b"k2");
        let mode = std::fs::metadata(out.join("tls.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let versions = std::fs::read_dir(&out)
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .count();
        assert_eq!(versions, 1, "the old version is removed");
    }
}
