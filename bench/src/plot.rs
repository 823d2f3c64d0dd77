//! SVG plots, written by hand (a few lines of markup do not justify a plotting library's
//! compile time): latency CDF per server and loss against offered load.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::report::{RunReport, medians};

const WIDTH: f64 = 780.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 210.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// One named line.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend.
    pub name: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

/// A line chart as an SVG document; `x_log` plots x on a log10 scale (values ≤ 0 skipped).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    x_log: bool,
) -> String {
    let fx = |x: f64| if x_log { x.max(1e-9).log10() } else { x };
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!x_log || *x > 0.0))
        .map(|(x, y)| (fx(x), y))
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, 0.0f64, f64::MIN);
    for (x, y) in &pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if pts.is_empty() {
        (x0, x1, y1) = (0.0, 1.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + pw / 2.0,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    for i in 0..=5 {
        let t = f64::from(i) / 5.0;
        let (xv, yv) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
        let xt = if x_log { 10f64.powf(xv) } else { xv };
        let _ = writeln!(
            svg,
            r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#ddd"/><text x="{0}" y="{3}" text-anchor="middle">{4}</text>"##,
            sx(xv),
            TOP,
            TOP + ph,
            TOP + ph + 16.0,
            tick(xt)
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="#ddd"/><text x="{3}" y="{4}" text-anchor="end">{5}</text>"##,
            LEFT,
            sy(yv),
            LEFT + pw,
            LEFT - 6.0,
            sy(yv) + 4.0,
            tick(yv)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        HEIGHT - 12.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">{1}</text>"#,
        TOP + ph / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!x_log || *x > 0.0))
            .map(|(x, y)| format!("{:.1},{:.1}", sx(fx(*x)), sy(*y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for p in &path {
            if let Some((x, y)) = p.split_once(',') {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{x}" cy="{y}" r="2.5" fill="{colour}"/>"#
                );
            }
        }
        let ly = TOP + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            LEFT + pw + 12.0,
            ly - 10.0,
            LEFT + pw + 30.0,
            ly,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        "0".to_owned()
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The plots for a set of runs, as (file name, SVG): per workload, the latency CDF of each
/// server (at half its knee when swept) and, for sweeps, loss against offered load.
///
/// A sweep without its half-knee step (`--no-half-knee`, as `bench-compare.sh` runs the
/// forwarder's, whose latency reference is a fixed run at uturn's half knee) has no curve:
/// its only latency is at the knee, queues full, which no other curve is measured at.
pub fn plots(reports: &[RunReport]) -> Vec<(String, String)> {
    let rows = medians(reports);
    let mut cdf: BTreeMap<&str, Vec<Series>> = BTreeMap::new();
    let mut loss: BTreeMap<&str, Vec<Series>> = BTreeMap::new();
    for (r, _) in &rows {
        let swept = r.mode == "sweep" || r.mode == "baseline";
        let latency = if swept {
            r.half_knee.as_ref()
        } else {
            r.latency_step()
        };
        if let Some(step) = latency.filter(|s| s.latency.count > 0) {
            cdf.entry(&r.workload).or_default().push(Series {
                name: match r.mode.as_str() {
                    "baseline-run" => format!("{} (fixed rate)", r.label),
                    _ => r.label.clone(),
                },
                points: step
                    .latency
                    .cdf
                    .iter()
                    .map(|(q, us)| (*us, q * 100.0))
                    .collect(),
            });
        }
        if r.steps.len() > 1 {
            let mut points: Vec<(f64, f64)> = r
                .steps
                .iter()
                .map(|s| (s.offered_pps, s.loss_ratio * 100.0))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            loss.entry(&r.workload).or_default().push(Series {
                name: r.label.clone(),
                points,
            });
        }
    }
    let mut out = Vec::new();
    for (w, series) in cdf {
        out.push((
            format!("latency-cdf-{w}.svg"),
            line_chart(
                &format!("Latency CDF, {w}"),
                "latency (µs, log scale)",
                "percentile",
                &series,
                true,
            ),
        ));
    }
    for (w, series) in loss {
        out.push((
            format!("loss-vs-load-{w}.svg"),
            line_chart(
                &format!("Loss against offered load, {w}"),
                "offered packets per second",
                "loss (%)",
                &series,
                false,
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_an_svg_with_one_line_per_series() {
        let series = [
            Series {
                name: "a<b".to_owned(),
                points: vec![(1.0, 0.0), (10.0, 50.0), (100.0, 100.0)],
            },
            Series {
                name: "c".to_owned(),
                points: vec![(2.0, 0.0), (20.0, 100.0)],
            },
        ];
        let svg = line_chart("t", "x", "y", &series, true);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a&lt;b"));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn a_sweep_without_its_half_knee_step_has_no_latency_curve() {
        use crate::report::tests::report;
        let mut uturn = report("uturn", 1000.0, 1.0);
        uturn.half_knee = Some(uturn.steps[0].clone());
        let forwarder_sweep = report("baseline", 1000.0, 1.0);
        let mut forwarder_run = report("baseline", 500.0, 1.0);
        forwarder_run.mode = "baseline-run".to_owned();
        forwarder_run.knee_pps = None;
        let plots = plots(&[uturn, forwarder_sweep, forwarder_run]);
        let (_, cdf) = plots
            .iter()
            .find(|(name, _)| name == "latency-cdf-small.svg")
            .expect("a latency plot");
        assert_eq!(cdf.matches("<polyline").count(), 2, "{cdf}");
        assert!(cdf.contains("baseline (fixed rate)") && cdf.contains(">uturn<"));
    }

    #[test]
    fn an_empty_chart_is_still_valid() {
        let svg = line_chart("t", "x", "y", &[], false);
        assert!(svg.contains("</svg>") && !svg.contains("NaN") && !svg.contains("inf"));
    }
}
