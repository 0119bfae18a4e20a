//! The run's timeline as hand-written SVG: one row per node name, coloured
//! by the process state over time, with the number of series the node owns
//! drawn as a line inside its row, and the scenario's events as vertical
//! marks.

use std::fmt::Write;

use crate::driver::{Mark, Sample};

const LEFT: f64 = 90.0;
const WIDTH: f64 = 1000.0;
const TOP: f64 = 60.0;
const ROW: f64 = 36.0;

fn colour(state: &str) -> &'static str {
    match state {
        "running" => "#8fd18f",
        "starting" => "#d7e8a0",
        "leaving" => "#f2d27a",
        "killed" => "#e57373",
        "fenced" => "#b39ddb",
        "frozen" => "#90caf9",
        _ => "#dddddd",
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders the picture. `end` is the run's length in seconds.
pub(crate) fn render(samples: &[Sample], marks: &[Mark], end: f64, series: u32) -> String {
    let mut rows: Vec<&str> = Vec::new();
    for s in samples {
        if !rows.contains(&s.node.as_str()) {
            rows.push(&s.node);
        }
    }
    let end = end.max(1.0);
    let x = |t: f64| LEFT + WIDTH * (t / end).clamp(0.0, 1.0);
    let height = TOP + ROW * rows.len() as f64 + 50.0;
    let max_owned = samples
        .iter()
        .map(|s| s.owned)
        .max()
        .unwrap_or(0)
        .max(series as usize / 2)
        .max(1) as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="11">"#,
        LEFT + WIDTH + 20.0
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="16" font-size="13">shoal demo: node states (colour) and series owned (line; top = {max_owned:.0}) over time</text>"#
    );
    // Legend.
    let mut lx = LEFT;
    for state in [
        "starting", "running", "frozen", "leaving", "killed", "fenced", "stopped",
    ] {
        let _ = writeln!(
            svg,
            r#"<rect x="{lx}" y="24" width="12" height="10" fill="{}"/><text x="{}" y="33">{state}</text>"#,
            colour(state),
            lx + 15.0
        );
        lx += 80.0;
    }
    for (r, name) in rows.iter().enumerate() {
        let y = TOP + ROW * r as f64;
        let _ = writeln!(
            svg,
            r#"<text x="4" y="{}">{}</text>"#,
            y + ROW / 2.0,
            escape(name)
        );
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.node == *name).collect();
        for pair in mine.windows(2) {
            if let [a, b] = pair {
                let (x0, x1) = (x(a.t), x(b.t));
                if x1 > x0 {
                    let _ = writeln!(
                        svg,
                        r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"#,
                        y + 2.0,
                        x1 - x0,
                        ROW - 4.0,
                        colour(a.state)
                    );
                }
            }
        }
        let points: Vec<String> = mine
            .iter()
            .map(|s| {
                let py = y + ROW - 3.0 - (ROW - 8.0) * (s.owned as f64 / max_owned).min(1.0);
                format!("{:.1},{py:.1}", x(s.t))
            })
            .collect();
        if points.len() > 1 {
            let _ = writeln!(
                svg,
                r##"<polyline points="{}" fill="none" stroke="#1f4e9c" stroke-width="1.5"/>"##,
                points.join(" ")
            );
        }
    }
    let bottom = TOP + ROW * rows.len() as f64;
    for (i, m) in marks.iter().enumerate() {
        let mx = x(m.t);
        let _ = writeln!(
            svg,
            r##"<line x1="{mx:.1}" y1="{}" x2="{mx:.1}" y2="{bottom}" stroke="#555" stroke-dasharray="3,3"/>"##,
            TOP - 6.0
        );
        let ty = bottom + 14.0 + 12.0 * (i % 3) as f64;
        let _ = writeln!(
            svg,
            r#"<text x="{mx:.1}" y="{ty}">{} ({:.1}s)</text>"#,
            escape(&m.label),
            m.t
        );
    }
    // Time axis ticks every 5 s.
    let mut t = 0.0;
    while t <= end {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{}" fill="#777">{t:.0}s</text>"##,
            x(t),
            TOP - 8.0
        );
        t += 5.0;
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rows_marks_and_escapes() {
        let samples = vec![
            Sample {
                t: 0.0,
                node: "n1".into(),
                state: "running",
                owned: 10,
            },
            Sample {
                t: 1.0,
                node: "n1".into(),
                state: "killed",
                owned: 0,
            },
            Sample {
                t: 1.0,
                node: "n<2>".into(),
                state: "running",
                owned: 5,
            },
            Sample {
                t: 2.0,
                node: "n<2>".into(),
                state: "running",
                owned: 15,
            },
        ];
        let marks = vec![Mark {
            t: 1.0,
            label: "kill n1".into(),
        }];
        let svg = render(&samples, &marks, 2.0, 16);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("n&lt;2&gt;"));
        assert!(svg.contains("kill n1 (1.0s)"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(colour("killed")) && svg.contains(colour("running")));
    }
}
