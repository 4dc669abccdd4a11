//! Text shared by several subcommands' output: message bodies, broker ids
//! and lag ages.

use base64::Engine as _;

/// The body as text when it is UTF-8, else base64; with the encoding name.
pub fn body_text(body: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(body) {
        Ok(s) => (s.to_string(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(body),
            "base64",
        ),
    }
}

pub(super) fn id_or_dash(id: u64) -> String {
    if id == 0 {
        "-".to_string()
    } else {
        id.to_string()
    }
}

/// A lag age for people: `-` for none, else ms / s / m / h.
pub(super) fn age(ms: u64) -> String {
    match ms {
        0 => "-".to_string(),
        1..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{:.1}m", ms as f64 / 60_000.0),
        _ => format!("{:.1}h", ms as f64 / 3_600_000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_utf8_or_base64() {
        assert_eq!(body_text(b"hi"), ("hi".to_string(), "utf8"));
        assert_eq!(body_text(&[0xff, 0x00]), ("/wA=".to_string(), "base64"));
    }
}
