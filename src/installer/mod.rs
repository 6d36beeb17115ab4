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

/// Lines between these markers are only needed by build Jobs (publishing images): pods carry
/// them blank, so every pod and ControllerRevision stays smaller.
const BUILD_ONLY_BEGIN: &str = "# kaspr-packages: build-only begin";
const BUILD_ONLY_END: &str = "# kaspr-packages: build-only end";

static BOOTSTRAP: LazyLock<String> = LazyLock::new(|| loader(&shipped(&for_pods(SOURCE))));
static BUILD_BOOTSTRAP: LazyLock<String> = LazyLock::new(|| loader(&shipped(SOURCE)));

/// `python3 -c` argument that runs `program`, compressed.
fn loader(program: &str) -> String {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing to a Vec cannot fail.
    let compressed = encoder
        .write_all(program.as_bytes())
        .and_then(|()| encoder.finish())
        .unwrap_or_default();
    let encoded = base64::engine::general_purpose::STANDARD.encode(compressed);
    format!(
        "import base64,zlib;exec(compile(zlib.decompress(base64.b64decode('{encoded}')),'{PROGRAM_NAME}','exec'))"
    )
}

/// The program with its build-only lines blank (line numbers kept for tracebacks).
fn for_pods(source: &str) -> String {
    let mut inside = false;
    source
        .split('\n')
        .map(|line| {
            if line.starts_with(BUILD_ONLY_BEGIN) {
                inside = true;
            }
            let kept = if inside { "" } else { line };
            if line.starts_with(BUILD_ONLY_END) {
                inside = false;
            }
            kept
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The whole program, for build Jobs that publish images.
pub fn build_bootstrap() -> &'static str {
    &BUILD_BOOTSTRAP
}

static DIGEST: LazyLock<String> =
    LazyLock::new(|| crate::spec::short_sha256(bootstrap().as_bytes()));

/// The `python3 -c` argument that runs the installer.
pub fn bootstrap() -> &'static str {
    &BOOTSTRAP
}

static BOOTSTRAP_JSON: LazyLock<Vec<u8>> =
    LazyLock::new(|| serde_json::to_vec(bootstrap()).unwrap_or_default());

/// [`bootstrap`] with its JSON form, serialized once, for patches that splice it in
/// ([`crate::patch::to_vec_splicing`]).
pub fn bootstrap_preserialized() -> crate::patch::Preserialized {
    (bootstrap(), BOOTSTRAP_JSON.as_slice())
}

/// A short digest of [`bootstrap`], so hashes over rendered pods need not read the whole program.
pub fn digest() -> &'static str {
    &DIGEST
}

/// The program as pods carry it: comment-only lines and docstrings blanked, every other line
/// unchanged, so the line numbers of a traceback are those of `kaspr-packages-webhook
/// installer`. Saves about a quarter of the compressed size of every injected pod and
/// ControllerRevision (see BENCHMARKS.md). A docstring becomes `""`, so a body that held only
/// its docstring stays valid.
fn shipped(source: &str) -> String {
    let mut out = Vec::new();
    let mut state = Scan::default();
    for (number, line) in source.split('\n').enumerate() {
        out.push(state.line(number, line));
    }
    out.join("\n")
}

#[derive(Default)]
struct Scan {
    /// Inside a triple-quoted string that is code, not a docstring: its delimiter.
    open_string: Option<&'static str>,
    /// Inside a multi-line docstring.
    in_docstring: bool,
    /// Inside a `def`/`class` header that has not reached its `:` yet.
    in_header: bool,
    /// The next statement may be a docstring (start of file, after a header).
    docstring_next: bool,
}

impl Scan {
    fn line(&mut self, number: usize, line: &str) -> String {
        const TRIPLES: [&str; 2] = ["\"\"\"", "'''"];
        if number == 0 {
            self.docstring_next = true;
        }
        if self.in_docstring {
            self.in_docstring = !line.contains("\"\"\"");
            return String::new();
        }
        if let Some(delimiter) = self.open_string {
            if line.matches(delimiter).count() % 2 == 1 {
                self.open_string = None;
            }
            return line.to_owned();
        }
        let code = line.trim_start();
        let indent = &line[..line.len() - code.len()];
        if code.is_empty() {
            return line.to_owned();
        }
        if code.starts_with('#') {
            return if number == 0 {
                line.to_owned()
            } else {
                String::new()
            };
        }
        let docstring_here = std::mem::take(&mut self.docstring_next);
        if let Some(rest) = code.strip_prefix("\"\"\"").filter(|_| docstring_here) {
            self.in_docstring = !rest.contains("\"\"\"");
            return format!("{indent}\"\"");
        }
        if code.starts_with("def ") || code.starts_with("async def ") || code.starts_with("class ")
        {
            self.in_header = true;
        }
        if self.in_header && code.trim_end().ends_with(':') {
            self.in_header = false;
            self.docstring_next = true;
        }
        for delimiter in TRIPLES {
            if line.matches(delimiter).count() % 2 == 1 {
                self.open_string = Some(delimiter);
            }
        }
        line.to_owned()
    }
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
        assert_eq!(out, shipped(&for_pods(SOURCE)));
        assert!(bootstrap().len() < SOURCE.len());
    }

    #[test]
    fn pods_carry_the_program_without_its_build_only_lines() {
        let pods = for_pods(SOURCE);
        assert_eq!(pods.split('\n').count(), SOURCE.split('\n').count());
        assert!(SOURCE.contains("def publish_image(") && !pods.contains("def publish_image("));
        assert!(SOURCE.contains(BUILD_ONLY_END) && !pods.contains(BUILD_ONLY_END));
        assert!(pods.contains("def run_build("), "the rest is kept");
        assert!(bootstrap().len() + 4000 < build_bootstrap().len());
        // Both programs are valid Python for the Python that runs them.
        for program in [shipped(&pods), shipped(SOURCE)] {
            let mut child = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import sys; compile(sys.stdin.read(), 'installer', 'exec')",
                ])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("python3 runs");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(program.as_bytes())
                .expect("written");
            assert!(child.wait().expect("exits").success());
        }
    }

    #[test]
    fn the_shipped_program_differs_only_in_comments_and_docstrings() {
        let shipped = shipped(SOURCE);
        assert_eq!(shipped.lines().count(), SOURCE.lines().count());
        assert!(shipped.len() < SOURCE.len() * 9 / 10, "little was blanked");
        // Python itself compares the two: the same syntax tree once docstrings are set aside.
        let check = r#"
import ast, sys
def tree(text):
    module = ast.parse(text)
    for node in ast.walk(module):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:]
    return ast.dump(module)
original, shipped = sys.argv[1], sys.argv[2]
sys.exit(0 if tree(open(original).read()) == tree(open(shipped).read()) else 1)
"#;
        let dir = tempfile::tempdir().expect("tempdir");
        let (original, blanked) = (dir.path().join("a.py"), dir.path().join("b.py"));
        std::fs::write(&original, SOURCE).expect("write");
        std::fs::write(&blanked, &shipped).expect("write");
        let status = std::process::Command::new("python3")
            .arg("-c")
            .arg(check)
            .arg(&original)
            .arg(&blanked)
            .status()
            .expect("python3 runs (the installer's own tests need it too)");
        assert!(
            status.success(),
            "the shipped program is not the same program"
        );
    }

    #[test]
    fn strings_that_look_like_comments_or_docstrings_are_kept() {
        let source = "\"\"\"Module.\n\nMore.\n\"\"\"\nimport os\n# a comment\nTEMPLATE = \"\"\"\n# not a comment\n\"\"\"\n\ndef f(\n    a,\n):\n    \"\"\"Doc.\"\"\"\n    x = 1  # trailing\n    return \"\"\"# kept\"\"\"\n\nclass C:\n    # note\n    \"\"\"Doc\n    more\"\"\"\n";
        let expected = "\"\"\n\n\n\nimport os\n\nTEMPLATE = \"\"\"\n# not a comment\n\"\"\"\n\ndef f(\n    a,\n):\n    \"\"\n    x = 1  # trailing\n    return \"\"\"# kept\"\"\"\n\nclass C:\n\n    \"\"\n\n";
        assert_eq!(shipped(source), expected);
    }
}
