//! What `explain` answers: plain lines, each with how much it matters, and the exit status a
//! script reads.

use serde::Serialize;

/// How much one line matters. The worst line decides the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// A fact that is as it should be.
    Ok,
    /// Context: neither good nor bad.
    Info,
    /// The object is not injected, and by design (excluded namespace, not a KasprApp's object,
    /// no `pythonPackages`, ...).
    NotInjected,
    /// Something to fix or wait for: out of date, invalid KasprApp, failed install, missing PVC,
    /// an injection that should be there and is not.
    Problem,
}

/// One line of the explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    pub severity: Severity,
    pub text: String,
}

/// The overall answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Injected, and what the KasprApp renders now.
    InjectedAndCurrent,
    /// Not injected, as configured.
    NotInjected,
    /// A problem was found.
    Problem,
}

impl Verdict {
    /// The exit status: 0, 3 or 4 (1 is an error before any explanation, 2 a usage error).
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::InjectedAndCurrent => 0,
            Verdict::NotInjected => EXIT_NOT_INJECTED,
            Verdict::Problem => EXIT_PROBLEM,
        }
    }
}

/// Exit status when the explanation could not be made (kubeconfig, API server, object missing).
pub const EXIT_ERROR: u8 = 1;
/// Exit status when the object is not injected, by design.
pub const EXIT_NOT_INJECTED: u8 = 3;
/// Exit status when a problem was found.
pub const EXIT_PROBLEM: u8 = 4;

/// The explanation of one object.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `Pod`, `StatefulSet` or `KasprApp`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub verdict: Verdict,
    pub exit_code: u8,
    /// The template hash the object carries, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
    /// The template hash the KasprApp renders now, when it renders one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_template_hash: Option<String>,
    /// The parts of the injection that differ from what the app renders now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<String>,
    /// Every validation error of the KasprApp, with its field path.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub validation_errors: Vec<String>,
    pub lines: Vec<Line>,
}

/// Collects lines while explaining.
#[derive(Debug, Default)]
pub struct Lines(pub Vec<Line>);

impl Lines {
    pub fn push(&mut self, severity: Severity, text: impl Into<String>) {
        self.0.push(Line {
            severity,
            text: text.into(),
        });
    }
    pub fn ok(&mut self, text: impl Into<String>) {
        self.push(Severity::Ok, text);
    }
    pub fn info(&mut self, text: impl Into<String>) {
        self.push(Severity::Info, text);
    }
    pub fn not_injected(&mut self, text: impl Into<String>) {
        self.push(Severity::NotInjected, text);
    }
    pub fn problem(&mut self, text: impl Into<String>) {
        self.push(Severity::Problem, text);
    }
    pub fn worst(&self) -> Severity {
        self.0
            .iter()
            .map(|l| l.severity)
            .max()
            .unwrap_or(Severity::Ok)
    }
}

impl Report {
    /// The report of `lines`; the verdict follows from the worst line.
    pub fn new(kind: &str, namespace: &str, name: &str, lines: Lines) -> Self {
        let verdict = match lines.worst() {
            Severity::Ok | Severity::Info => Verdict::InjectedAndCurrent,
            Severity::NotInjected => Verdict::NotInjected,
            Severity::Problem => Verdict::Problem,
        };
        Report {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            verdict,
            exit_code: verdict.exit_code(),
            template_hash: None,
            desired_template_hash: None,
            differences: Vec::new(),
            validation_errors: Vec::new(),
            lines: lines.0,
        }
    }

    /// The plain-text form: a heading, then one line each, marked by severity.
    pub fn to_text(&self) -> String {
        let verdict = match self.verdict {
            // An app is not injected itself: what it owns is.
            Verdict::InjectedAndCurrent if self.kind == "KasprApp" => {
                "valid, and what it owns is current"
            }
            Verdict::InjectedAndCurrent => "injected and current",
            Verdict::NotInjected => "not injected (by design)",
            Verdict::Problem => "problem found",
        };
        let mut out = format!(
            "{} {}/{}: {verdict}\n",
            self.kind, self.namespace, self.name
        );
        for line in &self.lines {
            let mark = match line.severity {
                Severity::Ok => "ok     ",
                Severity::Info => "info   ",
                Severity::NotInjected => "skip   ",
                Severity::Problem => "PROBLEM",
            };
            // Continuation lines (errors of a list) keep the column.
            let text = line.text.replace('\n', "\n          ");
            out.push_str(&format!("  {mark} {text}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_line_decides_the_verdict_and_exit_code() {
        let mut lines = Lines::default();
        lines.ok("a");
        lines.info("b");
        assert_eq!(Report::new("Pod", "n", "p", lines).exit_code, 0);
        let mut lines = Lines::default();
        lines.ok("a");
        lines.not_injected("b");
        let report = Report::new("Pod", "n", "p", lines);
        assert_eq!(
            (report.verdict, report.exit_code),
            (Verdict::NotInjected, 3)
        );
        let mut lines = Lines::default();
        lines.problem("c");
        lines.not_injected("b");
        let report = Report::new("Pod", "n", "p", lines);
        assert_eq!((report.verdict, report.exit_code), (Verdict::Problem, 4));
    }

    #[test]
    fn text_marks_each_line_and_indents_continuations() {
        let mut lines = Lines::default();
        lines.ok("namespace ok");
        lines.problem("invalid:\nspec.x: bad");
        let text = Report::new("KasprApp", "apps", "demo", lines).to_text();
        assert_eq!(
            text,
            "KasprApp apps/demo: problem found\n  ok      namespace ok\n  PROBLEM invalid:\n          spec.x: bad\n"
        );
    }
}
