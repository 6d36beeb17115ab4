//! Checks one package string of `spec.pythonPackages.packages`.
//!
//! Accepted: a PEP 508 requirement (name, extras, version specifiers including `===`, `==1.*`
//! and local versions, environment markers) or a direct reference (`git+https`, `git+ssh`,
//! `hg+https`, `svn+https`, `bzr+https`, `https`, `ssh`, or `git@host:path`), with or without
//! `name @ ` in front. Everything else is rejected: pip options, local paths, `file:` URLs,
//! whitespace or control characters outside a marker, shell metacharacters in a URL, strings
//! over 1000 characters. The installer passes requirements to pip as arguments, never through a
//! shell; these rules keep a requirement from ever being read as an option or a file.

use std::sync::LazyLock;

use regex::Regex;

/// Longest accepted requirement.
pub const MAX_LEN: usize = 1000;

/// Schemes a direct reference may use.
const URL_SCHEMES: &[&str] = &[
    "git+https://",
    "git+ssh://",
    "hg+https://",
    "svn+https://",
    "bzr+https://",
    "https://",
    "ssh://",
];

/// Characters that mean something to a shell and have no business in a package URL.
const URL_FORBIDDEN: &[&str] = &["`", "$(", ";", "|", "&", "<", ">", "\\", "\"", "'"];

static NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$").expect("valid regex")
});

/// PEP 440 public version with an optional local part; `.*` handled separately.
static VERSION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)^v?
        (?:[0-9]+!)?
        [0-9]+(?:\.[0-9]+)*
        (?:[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?[0-9]*)?
        (?:-[0-9]+|[-_.]?(?:post|rev|r)[-_.]?[0-9]*)?
        (?:[-_.]?dev[-_.]?[0-9]*)?
        (?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?$",
    )
    .expect("valid regex")
});

static SCP_LIKE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}:[A-Za-z0-9._~/-]+(?:@[A-Za-z0-9._/+-]+)?(?:#[A-Za-z0-9._=-]+)?$")
        .expect("valid regex")
});

const MARKER_VARIABLES: &[&str] = &[
    "python_version",
    "python_full_version",
    "os_name",
    "sys_platform",
    "platform_release",
    "platform_system",
    "platform_version",
    "platform_machine",
    "platform_python_implementation",
    "implementation_name",
    "implementation_version",
    "extra",
];

/// What a valid requirement turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// The distribution name, when one is given.
    pub name: Option<String>,
    pub kind: RequirementKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequirementKind {
    /// A name with version specifiers `(operator, version)`; empty when unpinned.
    Versioned(Vec<(String, String)>),
    /// A URL or VCS reference.
    Direct,
}

impl Requirement {
    /// True when installs of this requirement can change over time: no specifier at all, or
    /// only lower bounds.
    pub fn is_unpinned(&self) -> bool {
        match &self.kind {
            RequirementKind::Direct => false,
            RequirementKind::Versioned(specs) => specs
                .iter()
                .all(|(op, _)| op == ">=" || op == ">" || op == "!="),
        }
    }
}

/// Parses and checks one package string. The error says why it is not accepted.
pub fn parse(input: &str) -> Result<Requirement, String> {
    let requirement = parse_requirement(input)?;
    check_requirements_line(input)?;
    Ok(requirement)
}

/// The installer hands requirements to pip in a requirements file, where `\\` joins the next
/// line and whitespace before `-` or `#` starts an option or a comment anywhere on the line,
/// quoted markers included.
fn check_requirements_line(input: &str) -> Result<(), String> {
    if input.contains('\\') {
        return Err(
            "'\\' is not allowed (pip's requirements file joins the next line to it)".into(),
        );
    }
    if let Some(i) = input
        .char_indices()
        .find(|&(i, c)| c.is_whitespace() && input[i + 1..].starts_with(['-', '#']))
        .map(|(i, _)| i)
    {
        let what = if input[i + 1..].starts_with('#') {
            "a comment"
        } else {
            "an option"
        };
        return Err(format!(
            "whitespace before {:?} is not allowed (pip's requirements file reads it as {what})",
            &input[i + 1..i + 2]
        ));
    }

    Ok(())
}

fn parse_requirement(input: &str) -> Result<Requirement, String> {
    check_characters(input)?;
    // Split off the marker: it starts at the first `;` (after whitespace for URLs).
    let (head, marker) = match input.find(';') {
        Some(i) => (&input[..i], Some(&input[i + 1..])),
        None => (input, None),
    };
    if is_url_start(head) || SCP_LIKE.is_match(head.trim_end()) {
        return parse_bare_url(head, marker);
    }
    if let Some(parsed) = head
        .find('@')
        .and_then(|at| parse_named_url(head, at, marker))
    {
        return parsed;
    }
    parse_versioned(head, marker)
}

/// What no requirement may be or contain, whatever its form: too long, empty, control or
/// non-ASCII characters, pip options, `file:` URLs and local paths.
fn check_characters(input: &str) -> Result<(), String> {
    if input.chars().count() > MAX_LEN {
        return Err(format!("longer than {MAX_LEN} characters"));
    }
    if input.is_empty() {
        return Err("empty".into());
    }
    if input.chars().any(|c| c.is_control()) {
        return Err("contains a control character".into());
    }
    if input.starts_with('-') {
        return Err("pip options are not allowed".into());
    }
    if !input.is_ascii() {
        return Err("contains a non-ASCII character".into());
    }
    if input.to_ascii_lowercase().starts_with("file:") {
        return Err("file: URLs are not allowed".into());
    }
    if input.starts_with(['.', '/', '~']) {
        return Err("local paths are not allowed".into());
    }
    Ok(())
}

fn url_scheme_not_allowed() -> String {
    format!(
        "URL scheme not allowed (use one of {})",
        URL_SCHEMES.join(" ")
    )
}

/// A bare direct reference: a URL, which must name a wheel file (pip takes the distribution's
/// name from it).
fn parse_bare_url(head: &str, marker: Option<&str>) -> Result<Requirement, String> {
    let url = check_marker_separation(head, marker)?;
    check_url(url)?;
    check_wheel_file(url)?;
    if let Some(m) = marker {
        check_marker(m)?;
    }
    Ok(Requirement {
        name: None,
        kind: RequirementKind::Direct,
    })
}

/// `name[extras] @ url`; `None` when what follows the `@` is not a URL, so the text is read as
/// a name requirement instead.
fn parse_named_url(
    head: &str,
    at: usize,
    marker: Option<&str>,
) -> Option<Result<Requirement, String>> {
    let (name_part, url_part) = (&head[..at], &head[at + 1..]);
    let url_part = url_part.trim_start_matches(' ');
    if is_url_start(url_part) {
        let parsed = (|| -> Result<Requirement, String> {
            let name = check_name_and_extras(name_part.trim_end_matches(' '))?;
            let url = check_marker_separation(url_part, marker)?;
            check_url(url)?;
            if let Some(m) = marker {
                check_marker(m)?;
            }
            Ok(Requirement {
                name: Some(name),
                kind: RequirementKind::Direct,
            })
        })();
        return Some(parsed);
    }
    if url_part.to_ascii_lowercase().starts_with("file:") {
        return Some(Err("file: URLs are not allowed".into()));
    }
    if head.contains("://") {
        return Some(Err(url_scheme_not_allowed()));
    }
    None
}

/// A PEP 508 name requirement; whitespace is only allowed right before the marker's `;`.
fn parse_versioned(head: &str, marker: Option<&str>) -> Result<Requirement, String> {
    let head_trimmed = if marker.is_some() {
        head.trim_end_matches(' ')
    } else {
        head
    };
    if head_trimmed.contains(char::is_whitespace) {
        return Err("whitespace is only allowed in an environment marker after ';'".into());
    }
    if head_trimmed.contains("://") {
        return Err(url_scheme_not_allowed());
    }
    let (name_and_extras, specs) = split_specifiers(head_trimmed);
    if name_and_extras.contains('/') || name_and_extras.contains('\\') {
        return Err("local paths are not allowed".into());
    }
    let name = check_name_and_extras(name_and_extras)?;
    if specs.is_empty() && looks_like_archive(&name) {
        return Err(format!(
            "{name:?} looks like an archive file name, which pip installs as a local file"
        ));
    }
    let specs = check_specifiers(specs)?;
    if let Some(m) = marker {
        check_marker(m)?;
    }
    Ok(Requirement {
        name: Some(name),
        kind: RequirementKind::Versioned(specs),
    })
}

fn is_url_start(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    URL_SCHEMES.iter().any(|scheme| lower.starts_with(scheme))
}

/// For URLs a marker must be separated by whitespace (PEP 508); returns the URL itself.
fn check_marker_separation<'a>(head: &'a str, marker: Option<&str>) -> Result<&'a str, String> {
    let url = head.trim_end_matches(' ');
    if marker.is_some() && url.len() == head.len() {
        return Err(
            "';' is not allowed in a URL (a marker after a URL needs a space before ';')".into(),
        );
    }
    Ok(url)
}

/// pip's archive extensions: a bare requirement ending with one is read as a file path.
fn looks_like_archive(name: &str) -> bool {
    const ARCHIVES: &[&str] = &[
        ".zip",
        ".whl",
        ".tar.bz2",
        ".tbz",
        ".tar.xz",
        ".txz",
        ".tlz",
        ".tar.lz",
        ".tar.lzma",
        ".tar.gz",
        ".tgz",
        ".tar",
    ];
    let lower = name.to_ascii_lowercase();
    ARCHIVES.iter().any(|ext| lower.ends_with(ext))
}

fn check_url(url: &str) -> Result<(), String> {
    if url.contains(char::is_whitespace) {
        return Err("whitespace in a URL".into());
    }
    if let Some(bad) = URL_FORBIDDEN.iter().find(|bad| url.contains(*bad)) {
        return Err(format!("shell metacharacter {bad:?} in a URL"));
    }
    if SCP_LIKE.is_match(url) {
        return Ok(());
    }
    let (_, rest) = url
        .split_once("://")
        .ok_or_else(|| "not a URL".to_string())?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    let host = host.split(':').next().unwrap_or("");
    if host.is_empty() {
        return Err("URL has no host".into());
    }
    check_subdirectory(url)
}

/// pip reads a bare URL ending in `.whl` as a wheel and refuses one whose file name is not
/// `name-version[-build]-python-abi-platform.whl`.
fn check_wheel_file(url: &str) -> Result<(), String> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let file = path.rsplit('/').next().unwrap_or(path);
    let Some(stem) = file
        .strip_suffix(".whl")
        .or_else(|| file.strip_suffix(".WHL"))
    else {
        return Ok(());
    };
    let parts = stem.split('-').count();
    if (5..=6).contains(&parts) && stem.split('-').all(|p| !p.is_empty()) {
        Ok(())
    } else {
        Err(format!(
            "{file:?} is not a wheel file name (name-version[-build]-python-abi-platform.whl)"
        ))
    }
}

/// `#subdirectory=` must stay inside the checkout: relative, without `..`.
fn check_subdirectory(url: &str) -> Result<(), String> {
    let Some((_, fragment)) = url.split_once('#') else {
        return Ok(());
    };
    for (key, value) in fragment.split('&').filter_map(|kv| kv.split_once('=')) {
        if key == "subdirectory"
            && (value.is_empty()
                || value.starts_with('/')
                || value.split('/').any(|segment| segment == ".."))
        {
            return Err(format!(
                "subdirectory={value:?} must be a relative path inside the repository, without '..'"
            ));
        }
    }
    Ok(())
}

fn check_name_and_extras(s: &str) -> Result<String, String> {
    let (name, extras) = match s.find('[') {
        Some(i) => {
            let extras = s[i..]
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .ok_or_else(|| "unbalanced '[' in extras".to_string())?;
            (&s[..i], Some(extras))
        }
        None => (s, None),
    };
    if !NAME.is_match(name) {
        return Err(format!("{name:?} is not a valid distribution name"));
    }
    if let Some(extras) = extras {
        for extra in extras.split(',') {
            if !NAME.is_match(extra) {
                return Err(format!("{extra:?} is not a valid extra"));
            }
        }
    }
    Ok(name.to_owned())
}

/// Splits `name[extras]` from the version specifiers that follow.
fn split_specifiers(s: &str) -> (&str, &str) {
    let after_extras = s.find(']').map_or(0, |i| i + 1);
    match s[after_extras..].find(['<', '>', '=', '!', '~', '(']) {
        Some(i) => s.split_at(after_extras + i),
        None => (s, ""),
    }
}

fn check_specifiers(specs: &str) -> Result<Vec<(String, String)>, String> {
    let specs = match specs.strip_prefix('(') {
        Some(inner) => inner
            .strip_suffix(')')
            .ok_or_else(|| "unbalanced '(' in version specifiers".to_string())?,
        None => specs,
    };
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for spec in specs.split(',') {
        let op = ["===", "~=", "==", "!=", "<=", ">=", "<", ">"]
            .into_iter()
            .find(|op| spec.starts_with(op))
            .ok_or_else(|| format!("{spec:?} is not a version specifier"))?;
        let version = &spec[op.len()..];
        if version.is_empty() {
            return Err(format!("{spec:?} has no version"));
        }
        let valid = match op {
            // Arbitrary equality takes any string without separators.
            "===" => version
                .chars()
                .all(|c| c.is_ascii_graphic() && !"(),;".contains(c)),
            "==" | "!=" => {
                let base = version.strip_suffix(".*").unwrap_or(version);
                VERSION.is_match(base) && !(version.ends_with(".*") && base.contains('+'))
            }
            _ => VERSION.is_match(version) && !version.contains('+'),
        };
        if !valid {
            return Err(format!("{spec:?} is not a valid version specifier"));
        }
        if op == "~=" && !version.contains('.') {
            return Err(format!(
                "{spec:?}: '~=' needs a version with at least two parts"
            ));
        }
        out.push((op.to_owned(), version.to_owned()));
    }
    Ok(out)
}

/// Tokens of an environment marker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Variable,
    Str,
    Op,
    And,
    Or,
    Open,
    Close,
}

fn tokenize_marker(marker: &str) -> Result<Vec<Token>, String> {
    let bytes = marker.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c == ' ' || c == '\t' {
            i += 1;
            continue;
        }
        if c == '(' || c == ')' {
            tokens.push(if c == '(' { Token::Open } else { Token::Close });
            i += 1;
            continue;
        }
        if c == '"' || c == '\'' {
            let end = marker[i + 1..]
                .find(c)
                .ok_or_else(|| "unterminated string in marker".to_string())?;
            if marker[i + 1..i + 1 + end].contains('\\') {
                return Err("backslash in a marker string".into());
            }
            tokens.push(Token::Str);
            i += end + 2;
            continue;
        }
        if "<>=!~".contains(c) {
            let op = ["===", "~=", "==", "!=", "<=", ">=", "<", ">"]
                .into_iter()
                .find(|op| marker[i..].starts_with(op))
                .ok_or_else(|| format!("unknown operator at {:?}", &marker[i..]))?;
            tokens.push(Token::Op);
            i += op.len();
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let end = marker[i..]
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .map_or(marker.len(), |e| i + e);
            let word = &marker[i..end];
            i = end;
            match word {
                "and" => tokens.push(Token::And),
                "or" => tokens.push(Token::Or),
                "in" => tokens.push(Token::Op),
                "not" => {
                    // `not in`
                    let rest = marker[i..].trim_start();
                    if rest.starts_with("in")
                        && !rest[2..]
                            .starts_with(|ch: char| ch.is_ascii_alphanumeric() || ch == '_')
                    {
                        i = marker.len() - rest.len() + 2;
                        tokens.push(Token::Op);
                    } else {
                        return Err("'not' must be followed by 'in' in a marker".into());
                    }
                }
                w if MARKER_VARIABLES.contains(&w) => tokens.push(Token::Variable),
                w => return Err(format!("unknown marker variable {w:?}")),
            }
            continue;
        }
        return Err(format!("unexpected {c:?} in marker"));
    }
    Ok(tokens)
}

/// Checks marker grammar: `expr ((and|or) expr)*`, `expr = value op value | '(' marker ')'`.
fn check_marker(marker: &str) -> Result<(), String> {
    let tokens = tokenize_marker(marker)?;
    let mut pos = 0;
    parse_marker_or(&tokens, &mut pos)?;
    if pos != tokens.len() {
        return Err("unexpected text at the end of the marker".into());
    }
    Ok(())
}

fn parse_marker_or(tokens: &[Token], pos: &mut usize) -> Result<(), String> {
    parse_marker_expr(tokens, pos)?;
    while matches!(tokens.get(*pos), Some(Token::And | Token::Or)) {
        *pos += 1;
        parse_marker_expr(tokens, pos)?;
    }
    Ok(())
}

fn parse_marker_expr(tokens: &[Token], pos: &mut usize) -> Result<(), String> {
    match tokens.get(*pos) {
        Some(Token::Open) => {
            *pos += 1;
            parse_marker_or(tokens, pos)?;
            if tokens.get(*pos) != Some(&Token::Close) {
                return Err("unbalanced '(' in marker".into());
            }
            *pos += 1;
            Ok(())
        }
        Some(Token::Variable | Token::Str) => {
            let ok = matches!(tokens.get(*pos + 1), Some(Token::Op))
                && matches!(tokens.get(*pos + 2), Some(Token::Variable | Token::Str));
            if !ok {
                return Err("a marker compares a variable with a quoted string".into());
            }
            *pos += 3;
            Ok(())
        }
        None => Err("empty marker".into()),
        Some(_) => Err("a marker compares a variable with a quoted string".into()),
    }
}

/// `${NAME}`, as the installer expands it.
static VARIABLE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
        .unwrap_or_else(|_| unreachable!("a valid pattern"))
});

/// The `${NAME}`s of a package string, in order of first use.
pub fn variables(package: &str) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for found in VARIABLE.captures_iter(package) {
        if let Some(name) = found.get(1).map(|m| m.as_str())
            && !names.contains(&name)
        {
            names.push(name);
        }
    }
    names
}

#[cfg(test)]
mod tests;
