//! Go's `time.Duration` text, which Litestream's flags, config and listings use: [`parse`] for
//! what the user writes (`1h30m`, `500ms`), [`format()`] for what `walstream` prints (`1h2m3s`).

use std::time::Duration;

/// Go's `time.ParseDuration`: a sequence of number+unit, e.g. `1h30m`, `1.5s`, `500ms`.
pub(crate) fn parse(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}; use e.g. 1s, 500ms, 24h, 1h30m");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let value: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// Go's `time.Duration.String` for non-negative durations: `1h2m3.5s`, `250ms`, `0s`.
pub(crate) fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    if nanos < 1_000_000_000 {
        let (value, unit) = if nanos < 1_000 {
            (nanos as f64, "ns")
        } else if nanos < 1_000_000 {
            (nanos as f64 / 1e3, "µs")
        } else {
            (nanos as f64 / 1e6, "ms")
        };
        return format!("{}{unit}", trim_float(value));
    }
    let total_seconds = d.as_secs();
    let (hours, minutes) = (total_seconds / 3600, total_seconds / 60 % 60);
    let seconds = (total_seconds % 60) as f64 + f64::from(d.subsec_nanos()) / 1e9;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&format!("{}s", trim_float(seconds)));
    out
}

fn trim_float(value: f64) -> String {
    let text = format!("{value:.9}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert!(parse("5").is_err() && parse("").is_err() && parse("1d").is_err());
    }

    #[test]
    fn durations_print_like_go() {
        assert_eq!(format(Duration::from_secs(3_723)), "1h2m3s");
        assert_eq!(format(Duration::from_millis(2_300)), "2.3s");
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::ZERO), "0s");
        assert_eq!(format(Duration::from_secs(60)), "1m0s");
    }
}
