//! Kubernetes resource quantities (`256Mi`, `1Gi`, `500m`, `1e3`, `128974848`).

/// A parsed quantity, as a number of base units (bytes for sizes, cores for CPU).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Quantity(pub f64);

impl Quantity {
    /// The quantity in whole bytes, rounded up; `None` when negative or not finite.
    pub fn to_bytes(self) -> Option<u64> {
        let v = self.0.ceil();
        (v.is_finite() && v >= 0.0 && v < u64::MAX as f64).then_some(v as u64)
    }
}

const BINARY: &[(&str, f64)] = &[
    ("Ki", 1024.0),
    ("Mi", 1_048_576.0),
    ("Gi", 1_073_741_824.0),
    ("Ti", 1_099_511_627_776.0),
    ("Pi", 1_125_899_906_842_624.0),
    ("Ei", 1_152_921_504_606_846_976.0),
];

const DECIMAL: &[(&str, f64)] = &[
    ("n", 1e-9),
    ("u", 1e-6),
    ("m", 1e-3),
    ("k", 1e3),
    ("M", 1e6),
    ("G", 1e9),
    ("T", 1e12),
    ("P", 1e15),
    ("E", 1e18),
];

/// Parses a quantity with the Kubernetes grammar:
/// `[+-]digits[.digits](suffix)`, suffix one of `Ki Mi Gi Ti Pi Ei`, `n u m k M G T P E`, or
/// an exponent `e<int>`/`E<int>`.
pub fn parse(input: &str) -> Result<Quantity, String> {
    let s = input;
    let number_end = s
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || ((c == '+' || c == '-') && i == 0)))
        .map_or(s.len(), |(i, _)| i);
    let (number, suffix) = s.split_at(number_end);
    let digits = number.trim_start_matches(['+', '-']);
    let valid_number = !digits.is_empty()
        && digits != "."
        && digits.matches('.').count() <= 1
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !valid_number {
        return Err(format!("{input:?} is not a valid quantity"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{input:?} is not a valid quantity"))?;
    let multiplier = if suffix.is_empty() {
        1.0
    } else if let Some((_, m)) = BINARY
        .iter()
        .chain(DECIMAL)
        .find(|(name, _)| *name == suffix)
    {
        *m
    } else if let Some(exp) = suffix.strip_prefix(['e', 'E']) {
        let digits = exp.trim_start_matches(['+', '-']);
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("{input:?} is not a valid quantity"));
        }
        let exp: i32 = exp
            .parse()
            .map_err(|_| format!("{input:?} is not a valid quantity"))?;
        10f64.powi(exp)
    } else {
        return Err(format!(
            "{input:?} is not a valid quantity (suffix {suffix:?} unknown; use Ki Mi Gi Ti, k M G T, or m)"
        ));
    };
    Ok(Quantity(value * multiplier))
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case("256Mi", 268_435_456)]
    #[case("1Gi", 1_073_741_824)]
    #[case("1G", 1_000_000_000)]
    #[case("512k", 512_000)]
    #[case("2Ki", 2048)]
    #[case("1Ti", 1_099_511_627_776)]
    #[case("1000", 1000)]
    #[case("1.5Gi", 1_610_612_736)]
    #[case("1e3", 1000)]
    #[case("0.5", 1)]
    fn bytes(#[case] input: &str, #[case] expected: u64) {
        assert_eq!(parse(input).expect("valid").to_bytes(), Some(expected));
    }

    #[rstest]
    #[case("100m", 0.1)]
    #[case("2", 2.0)]
    #[case("+1.5", 1.5)]
    fn cpu(#[case] input: &str, #[case] expected: f64) {
        assert!((parse(input).expect("valid").0 - expected).abs() < 1e-12);
    }

    #[rstest]
    #[case("")]
    #[case("Mi")]
    #[case("1MB")]
    #[case("1 Gi")]
    #[case("1.2.3")]
    #[case("1gi")]
    #[case("abc")]
    #[case("1e")]
    #[case(".")]
    fn invalid(#[case] input: &str) {
        assert!(parse(input).is_err(), "{input:?} accepted");
    }

    #[test]
    fn negative_is_not_a_size() {
        assert_eq!(parse("-1Gi").expect("valid").to_bytes(), None);
    }
}
