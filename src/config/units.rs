//! Durations (`500ms`, `2s`) and sizes (`16k`, `1m`) as written in the config.

use std::time::Duration;

use super::file::Scalar;

pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Bytes, with an optional k/m/g suffix (powers of 1024, as nginx reads them).
pub fn size(v: &Scalar) -> Result<u64, String> {
    let s = match v {
        Scalar::Int(n) => return Ok(*n),
        Scalar::Str(s) => s.trim(),
    };
    let (digits, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?} (use bytes or a k/m/g suffix, e.g. 16k)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size(&Scalar::Str("16k".into())), Ok(16384));
        assert_eq!(size(&Scalar::Str("8M".into())), Ok(8 << 20));
        assert_eq!(size(&Scalar::Int(10)), Ok(10));
        assert!(size(&Scalar::Str("ten".into())).is_err());
        assert!(size(&Scalar::Str("99999999999999g".into())).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("2s"), Ok(Duration::from_secs(2)));
        assert!(duration("soon").is_err());
    }
}
