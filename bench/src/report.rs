//! What a run prints and writes: the table, the JSON summary, the full HDR
//! percentile distribution and the percentile-curve plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::load::{LoadResult, OutputArgs};

/// Percentiles of a histogram recorded in nanoseconds, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let us = |nanos: u64| nanos as f64 / 1_000.0;
        Self {
            count: histogram.len(),
            mean_us: histogram.mean() / 1_000.0,
            p50_us: us(histogram.value_at_quantile(0.50)),
            p90_us: us(histogram.value_at_quantile(0.90)),
            p99_us: us(histogram.value_at_quantile(0.99)),
            p999_us: us(histogram.value_at_quantile(0.999)),
            max_us: us(histogram.max()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub mode: String,
    pub target: String,
    pub connections: usize,
    pub pipeline: usize,
    pub warmup_seconds: f64,
    pub asked_rate: f64,
    pub achieved_rate: f64,
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// From each request's scheduled send time (coordinated omission corrected).
    pub latency: Percentiles,
    /// From each request's actual send time.
    pub service_time: Percentiles,
    /// How far behind schedule the harness sent.
    pub send_lateness: Percentiles,
    /// Mode-specific figures (reload swaps, ingest rates).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

impl Summary {
    pub fn new(
        mode: &str,
        target: String,
        plan: &crate::load::LoadPlan,
        result: &LoadResult,
    ) -> Self {
        Self {
            mode: mode.to_owned(),
            target,
            connections: plan.connections,
            pipeline: plan.pipeline,
            warmup_seconds: plan.warmup.as_secs_f64(),
            asked_rate: plan.rate,
            achieved_rate: result.achieved_rate(),
            requests: result.completed(),
            ok: result.ok,
            errors: result.error_count(),
            errors_by_kind: result.errors.clone(),
            latency: Percentiles::of(&result.latency),
            service_time: Percentiles::of(&result.service),
            send_lateness: Percentiles::of(&result.send_lateness),
            extra: serde_json::Value::Null,
        }
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} → {}   connections {}, pipeline {}, warm-up {:.0} s",
            self.mode, self.target, self.connections, self.pipeline, self.warmup_seconds
        );
        let _ = writeln!(
            out,
            "rate: asked {:.0}/s, achieved {:.0}/s ({:.1}%)   requests {}   errors {}{}",
            self.asked_rate,
            self.achieved_rate,
            100.0 * self.achieved_rate / self.asked_rate,
            self.requests,
            self.errors,
            if self.errors_by_kind.is_empty() {
                String::new()
            } else {
                format!(" {:?}", self.errors_by_kind)
            }
        );
        let _ = writeln!(
            out,
            "{:<34} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "latency (µs)", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, p) in [
            ("from schedule (CO-corrected)", &self.latency),
            ("service time (from actual send)", &self.service_time),
            ("harness send lateness", &self.send_lateness),
        ] {
            let _ = writeln!(
                out,
                "{:<34} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                name, p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us
            );
        }
        out
    }
}

/// Prints the table and writes what `output` asks for. `curves` are the
/// latency histograms to plot and write, labelled.
pub fn emit<T: Serialize>(
    output: &OutputArgs,
    table: &str,
    json: &T,
    curves: &[(String, &Histogram<u64>)],
) -> Result<()> {
    print!("{table}");
    if let Some(path) = &output.json {
        let text = serde_json::to_string_pretty(json).context("failed to encode the summary")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    if let Some(path) = &output.hdr {
        let mut text = String::new();
        for (label, histogram) in curves {
            text.push_str(&percentile_distribution(label, histogram));
        }
        std::fs::write(path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    if let Some(path) = &output.plot {
        plot(path, &output.font, curves)?;
    }
    Ok(())
}

/// HdrHistogram's `outputPercentileDistribution` text, values in microseconds.
pub fn percentile_distribution(label: &str, histogram: &Histogram<u64>) -> String {
    let mut out = format!(
        "# {label}\n{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for step in histogram.iter_quantiles(5) {
        let quantile = step.quantile_iterated_to();
        let inverse = if quantile < 1.0 {
            format!("{:>14.2}", 1.0 / (1.0 - quantile))
        } else {
            format!("{:>14}", "")
        };
        let _ = writeln!(
            out,
            "{:>12.3} {:>14.12} {:>10} {inverse}",
            step.value_iterated_to() as f64 / 1_000.0,
            quantile,
            step.count_since_last_iteration()
        );
    }
    let p = Percentiles::of(histogram);
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]\n",
        p.mean_us,
        histogram.stdev() / 1_000.0,
        p.max_us,
        histogram.len()
    );
    out
}

/// The percentile curve, x on HdrHistogram's "number of nines" scale.
fn plot(path: &Path, font: &Path, curves: &[(String, &Histogram<u64>)]) -> Result<()> {
    use plotters::prelude::*;

    let bytes = std::fs::read(font).with_context(|| {
        format!(
            "the plot needs a TrueType font: {} is not readable (install fonts-dejavu-core or pass --font)",
            font.display()
        )
    })?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", font.display()))?;

    const MAX_NINES: f64 = 5.0;
    let points = |histogram: &Histogram<u64>| -> Vec<(f64, f64)> {
        histogram
            .iter_quantiles(5)
            .map(|step| {
                let q = step.quantile_iterated_to();
                let nines = if q >= 1.0 {
                    MAX_NINES
                } else {
                    (-(1.0 - q).log10()).min(MAX_NINES)
                };
                (nines, step.value_iterated_to() as f64 / 1_000.0)
            })
            .collect()
    };
    let series: Vec<(String, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|(label, histogram)| (label.clone(), points(histogram)))
        .collect();
    // Log scale: the tail is often 100x the median, and a linear axis
    // flattens everything below p99 into the floor.
    let values = || {
        series
            .iter()
            .flat_map(|(_, points)| points.iter().map(|p| p.1))
    };
    let y_max = values().fold(1.0, f64::max) * 1.5;
    let y_min = (values().fold(f64::INFINITY, f64::min) * 0.8).clamp(0.1, y_max / 10.0);

    let root = BitMapBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).context("failed to draw the plot")?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency by percentile (from scheduled send)",
            ("sans-serif", 28),
        )
        .margin(20)
        .margin_right(60)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..MAX_NINES, (y_min..y_max).log_scale())
        .context("failed to lay out the plot")?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|nines| match nines.round() as i32 {
            0 => "0%".into(),
            1 => "90%".into(),
            2 => "99%".into(),
            3 => "99.9%".into(),
            4 => "99.99%".into(),
            _ => "99.999%".into(),
        })
        .x_desc("percentile")
        .y_desc("latency (µs, log scale)")
        .y_label_formatter(&|v| format!("{v}"))
        .label_style(("sans-serif", 16))
        .draw()
        .context("failed to draw the axes")?;
    for (index, (label, points)) in series.into_iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .context("failed to draw a curve")?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .context("failed to draw the legend")?;
    root.present()
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distribution_lists_rising_values_up_to_the_max() {
        let mut histogram = crate::load::nanos_histogram();
        for micros in 1..=1_000u64 {
            histogram.record(micros * 1_000).unwrap();
        }
        let text = percentile_distribution("t", &histogram);
        let values: Vec<f64> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && !l.contains("Value"))
            .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
            .collect();
        assert!(values.windows(2).all(|w| w[0] <= w[1]));
        assert!((values[values.len() - 1] - 1_000.0).abs() < 1.0);
        assert!(text.contains("Total count    =         1000"));
    }

    #[test]
    fn a_plot_is_a_png() {
        let mut histogram = crate::load::nanos_histogram();
        for micros in 1..=10_000u64 {
            histogram.record(micros * 100).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let output = OutputArgs {
            plot: Some(path.clone()),
            ..OutputArgs::default()
        };
        let font = std::path::PathBuf::from("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
        emit(
            &OutputArgs { font, ..output },
            "",
            &serde_json::json!({}),
            &[("run".into(), &histogram)],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 5_000);
    }
}
