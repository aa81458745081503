//! The replication benchmark's chart: one SVG, a panel per measure, a bar per tool. Written by
//! hand rather than with a plotting crate: a few rectangles and labels need no font machinery.

use std::fmt::Write;

/// One tool's bars.
pub struct Values {
    pub label: &'static str,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub cpu_secs: f64,
    pub peak_rss_mib: f64,
}

const COLORS: [&str; 2] = ["#2b7bba", "#e07b39"];
const WIDTH: f64 = 720.0;
const PANEL_HEIGHT: f64 = 110.0;
const LABEL_WIDTH: f64 = 190.0;
const BAR_HEIGHT: f64 = 22.0;

/// A chart panel: its title, the value it draws and that value's unit.
type Panel = (&'static str, fn(&Values) -> f64, &'static str);

pub fn svg(walstream: &Values, litestream: &Values) -> String {
    let panels: [Panel; 4] = [
        ("idle commit → bucket, p50", |v| v.lag_p50_ms, "ms"),
        ("idle commit → bucket, p99", |v| v.lag_p99_ms, "ms"),
        ("CPU for a saturated writer (load + drain)", |v| v.cpu_secs, "CPU-s"),
        ("replicator peak RSS", |v| v.peak_rss_mib, "MiB"),
    ];
    let height = 40.0 + PANEL_HEIGHT * panels.len() as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">walstream vs litestream v0.3.13, same run, same fake-gcs-server (shorter is better)</text>"#
    );
    for (n, (title, value, unit)) in panels.iter().enumerate() {
        let top = 40.0 + PANEL_HEIGHT * n as f64;
        let _ = writeln!(out, r#"<text x="10" y="{}" font-weight="bold">{}</text>"#, top + 16.0, escape(title));
        let max = value(walstream).max(value(litestream)).max(f64::MIN_POSITIVE);
        let span = WIDTH - LABEL_WIDTH - 110.0;
        for (row, (tool, color)) in [walstream, litestream].iter().zip(COLORS).enumerate() {
            let y = top + 28.0 + row as f64 * (BAR_HEIGHT + 8.0);
            let width = (value(tool) / max * span).max(1.0);
            let _ = writeln!(out, r#"<text x="10" y="{}">{}</text>"#, y + 16.0, escape(tool.label));
            let _ = writeln!(
                out,
                r#"<rect x="{LABEL_WIDTH}" y="{y}" width="{width:.1}" height="{BAR_HEIGHT}" fill="{color}"/>"#
            );
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{}">{} {unit}</text>"#,
                LABEL_WIDTH + width + 6.0,
                y + 16.0,
                format_value(value(tool))
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_larger_value_and_carry_their_numbers() {
        let ws = Values { label: "walstream", lag_p50_ms: 10.0, lag_p99_ms: 20.0, cpu_secs: 1.0, peak_rss_mib: 12.0 };
        let ls = Values {
            label: "litestream <v0.3.13>",
            lag_p50_ms: 500.0,
            lag_p99_ms: 1000.0,
            cpu_secs: 15.0,
            peak_rss_mib: 100.0,
        };
        let svg = svg(&ws, &ls);
        assert!(svg.contains("500 ms") && svg.contains("10.0 ms") && svg.contains("15.0 CPU-s"), "{svg}");
        assert!(svg.contains("litestream &lt;v0.3.13&gt;"));
        // The larger value of each panel spans the whole bar area.
        assert_eq!(svg.matches(&format!(r#"width="{:.1}""#, WIDTH - LABEL_WIDTH - 110.0)).count(), 4);
    }
}
