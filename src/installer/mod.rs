//! The in-pod installer program, embedded in the binary.
//!
//! The init container runs `python3 -c <bootstrap>`: a one-line loader holding the program
//! compressed, so every pod and ControllerRevision carries a few kilobytes instead of the full
//! source. `kaspr-packages-webhook installer` prints the readable program.

use std::io::Write as _;
use std::sync::LazyLock;

use base64::Engine as _;

/// The installer's Python source.
pub const SOURCE: &str = include_str!("installer.py");

/// Name the program runs under in tracebacks.
const PROGRAM_NAME: &str = "kaspr-packages-installer";

static BOOTSTRAP: LazyLock<String> = LazyLock::new(|| {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing to a Vec cannot fail.
    let compressed = encoder
        .write_all(SOURCE.as_bytes())
        .and_then(|()| encoder.finish())
        .unwrap_or_default();
    let encoded = base64::engine::general_purpose::STANDARD.encode(compressed);
    format!(
        "import base64,zlib;exec(compile(zlib.decompress(base64.b64decode('{encoded}')),'{PROGRAM_NAME}','exec'))"
    )
});

static DIGEST: LazyLock<String> =
    LazyLock::new(|| crate::spec::short_sha256(bootstrap().as_bytes()));

/// The `python3 -c` argument that runs the installer.
pub fn bootstrap() -> &'static str {
    &BOOTSTRAP
}

/// A short digest of [`bootstrap`], so hashes over rendered pods need not read the whole program.
pub fn digest() -> &'static str {
    &DIGEST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_decodes_to_the_source() {
        let b64 = bootstrap().split('\'').nth(1).expect("quoted payload");
        let compressed = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        let mut out = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::ZlibDecoder::new(compressed.as_slice()),
            &mut out,
        )
        .expect("zlib");
        assert_eq!(out, SOURCE);
        assert!(bootstrap().len() < SOURCE.len());
    }
}
