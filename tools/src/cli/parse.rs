//! Parsers of argument values shared by several subcommands: properties,
//! retention times, byte counts and points in time.

use super::{CliError, CliResult};
use std::time::Duration;

/// `NAME=VALUE`; the value may contain '='.
pub fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

/// A humantime duration, or "forever" / "0" for no limit (zero).
pub fn parse_retention(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("forever") || t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|e| format!("{e} (try 7d, 12h or forever)"))
}

/// A byte count with an optional unit: B, K/KiB, M/MiB, G/GiB, T/TiB
/// (binary) or KB, MB, GB, TB (decimal).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a byte count like 1048576 or 10GiB, got {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(format!("unknown unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A time given as epoch ms or RFC 3339, as epoch ms.
pub(super) fn parse_time(t: &str) -> CliResult<i64> {
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    let at = humantime::parse_rfc3339_weak(t).map_err(|e| {
        CliError::Usage(format!(
            "time {t:?}: {e} (use RFC 3339 like 2026-11-26T10:00:00Z, or epoch ms)"
        ))
    })?;
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| CliError::Usage(format!("time {t:?} is before 1970")))?
        .as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_and_sizes_parse() {
        assert_eq!(
            parse_property("a=b=c").unwrap(),
            ("a".to_string(), "b=c".to_string())
        );
        assert!(parse_property("=x").is_err());
        assert!(parse_property("novalue").is_err());
        assert_eq!(parse_bytes("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_bytes("5MB").unwrap(), 5_000_000);
        assert_eq!(parse_bytes("42").unwrap(), 42);
        assert!(parse_bytes("x").is_err());
        assert!(parse_bytes("99999999999T").is_err());
        assert_eq!(parse_retention("forever").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_retention("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
    }
}
