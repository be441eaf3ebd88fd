//! [`Dur`]: the duration type every timing setting is written in ("30s", "5m", "3d").

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// A duration written "30s", "5m", "4h", "3d" or "500ms".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(s: &str) -> Result<Dur, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| "a number with a unit: 500ms, 30s, 5m, 4h or 3d".to_string())?;
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| "a whole number with a unit: 500ms, 30s, 5m, 4h or 3d".to_string())?;
        let secs = match unit {
            "ms" => return Ok(Dur(Duration::from_millis(n))),
            "s" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3600),
            "d" => n.checked_mul(86_400),
            _ => None,
        };
        secs.map(|s| Dur(Duration::from_secs(s)))
            .ok_or_else(|| "a duration with unit ms, s, m, h or d, such as 30s or 3d".to_string())
    }

    pub fn as_std(self) -> Duration {
        self.0
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let (n, unit) = if !ms.is_multiple_of(1000) {
            (ms, "ms")
        } else {
            let s = self.0.as_secs();
            match s {
                _ if s != 0 && s.is_multiple_of(86_400) => (u128::from(s / 86_400), "d"),
                _ if s != 0 && s.is_multiple_of(3600) => (u128::from(s / 3600), "h"),
                _ if s != 0 && s.is_multiple_of(60) => (u128::from(s / 60), "m"),
                _ => (u128::from(s), "s"),
            }
        };
        write!(f, "{n}{unit}")
    }
}

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_in_their_largest_unit() {
        for (s, d) in [("30s", 30), ("5m", 300), ("4h", 14_400), ("3d", 259_200)] {
            assert_eq!(Dur::parse(s).unwrap(), Dur(Duration::from_secs(d)));
            assert_eq!(Dur::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Dur::parse("250ms").unwrap().to_string(), "250ms");
        assert!(Dur::parse("5").is_err());
        assert!(Dur::parse("5w").is_err());
        assert!(Dur::parse("-5s").is_err());
    }
}
