//! The in-pod installer program, embedded in the binary.

/// The installer's Python source.
pub const SOURCE: &str = include_str!("installer.py");
