//! Times in configuration files: `500ms`, `10s`, `5m`, `24h`, or a plain number in the
//! attribute's legacy SafeKit unit (so a SafeKit module keeps its meaning).

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Millis,
    Seconds,
    Hours,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Millis => "milliseconds",
            Unit::Seconds => "seconds",
            Unit::Hours => "hours",
        }
    }
}

/// Parses `raw`; a number without unit is in `legacy`.
pub fn parse(raw: &str, legacy: Unit) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let value: u64 = number.parse().map_err(|_| {
        format!(
            "'{raw}' is not a duration: expected a whole number with ms, s, m or h (a plain number is in {})",
            legacy.name()
        )
    })?;
    let millis = match (unit.trim(), legacy) {
        ("ms", _) | ("", Unit::Millis) => Some(value),
        ("s", _) | ("", Unit::Seconds) => value.checked_mul(1_000),
        ("m" | "min", _) => value.checked_mul(60_000),
        ("h", _) | ("", Unit::Hours) => value.checked_mul(3_600_000),
        (other, _) => {
            return Err(format!(
                "'{raw}': unknown unit '{other}'; use ms, s, m or h"
            ));
        }
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("'{raw}' is too long a duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_legacy_numbers() {
        assert_eq!(parse("700", Unit::Millis), Ok(Duration::from_millis(700)));
        assert_eq!(parse("10", Unit::Seconds), Ok(Duration::from_secs(10)));
        assert_eq!(parse("24", Unit::Hours), Ok(Duration::from_secs(24 * 3600)));
        assert_eq!(parse("250ms", Unit::Hours), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5m", Unit::Millis), Ok(Duration::from_secs(300)));
        assert_eq!(parse(" 2s ", Unit::Millis), Ok(Duration::from_secs(2)));
        assert!(parse("2 days", Unit::Seconds)
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse("-1", Unit::Seconds)
            .unwrap_err()
            .contains("not a duration"));
        assert!(parse("s", Unit::Seconds).is_err());
    }
}
