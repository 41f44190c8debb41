//! The bench plot: seen vs unseen accuracy of every method, and per-class accuracy before and
//! after adaptation with the recommended method.

use std::path::Path;

use plotters::prelude::*;

use super::BenchReport;

static FONT: &[u8] = include_bytes!("font/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is compiled in, so this cannot fail at run time.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Writes a 1400x560 PNG. `after` names the method whose per-class accuracy is compared with the
/// source model's.
pub fn write(report: &BenchReport, after: &str, path: &Path) -> anyhow::Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(520);
    scatter(report, &left)?;
    per_class(report, after, &right)?;
    root.present()?;
    Ok(())
}

fn scatter(report: &BenchReport, area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> anyhow::Result<()> {
    let points: Vec<(&str, f64, f64)> = report
        .order
        .iter()
        .filter(|name| report.methods[*name].ran())
        .map(|name| (name.as_str(), 100.0 * report.methods[name].seen.mean, 100.0 * report.methods[name].unseen.mean))
        .collect();
    let (min_x, max_x) = bounds(points.iter().map(|p| p.1));
    let (min_y, max_y) = bounds(points.iter().map(|p| p.2));
    let mut chart = ChartBuilder::on(area)
        .caption("seen vs unseen accuracy (%)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(min_x..max_x, min_y..max_y)?;
    chart.configure_mesh().x_desc("seen classes").y_desc("unseen classes").label_style(("sans-serif", 13)).draw()?;
    if let Some(source) = report.methods.get("source") {
        let (sx, sy) = (100.0 * source.seen.mean, 100.0 * source.unseen.mean);
        chart.draw_series(LineSeries::new([(sx, min_y), (sx, max_y)], RGBColor(180, 180, 180)))?;
        chart.draw_series(LineSeries::new([(min_x, sy), (max_x, sy)], RGBColor(180, 180, 180)))?;
    }
    for (index, (name, x, y)) in points.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart.draw_series([Circle::new((*x, *y), 5, color.filled())])?;
        chart.draw_series([Text::new(name.to_string(), (*x, *y), ("sans-serif", 13).into_font().color(&BLACK))])?;
    }
    Ok(())
}

fn per_class(
    report: &BenchReport,
    after: &str,
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
) -> anyhow::Result<()> {
    let ran = |name: &str| report.methods.get(name).filter(|m| m.ran());
    let (Some(before), Some(adapted)) = (ran("source"), ran(after)) else {
        area.draw(&Text::new(
            format!("per-class plot needs 'source' and '{after}' rows"),
            (20, 20),
            ("sans-serif", 16),
        ))?;
        return Ok(());
    };
    let classes = report.classes.len();
    let mean_per_class = |runs: &[super::SeedRun]| -> Vec<f64> {
        (0..classes)
            .map(|c| {
                let values: Vec<f64> = runs.iter().filter_map(|r| r.per_class[c]).collect();
                100.0 * values.iter().sum::<f64>() / values.len().max(1) as f64
            })
            .collect()
    };
    let (before, adapted) = (mean_per_class(&before.runs), mean_per_class(&adapted.runs));
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("per-class accuracy (%): source (grey) vs {after} (colour; seen = blue, unseen = orange)"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..(classes as f64 - 0.5), 0f64..100f64)?;
    let names = report.classes.clone();
    chart
        .configure_mesh()
        .x_labels(classes)
        .x_label_formatter(&|x| names.get(x.round() as usize).cloned().unwrap_or_default())
        .label_style(("sans-serif", 12))
        .disable_x_mesh()
        .draw()?;
    for (c, (b, a)) in before.iter().zip(&adapted).enumerate() {
        let x = c as f64;
        let seen = report.seen_classes.contains(&report.classes[c]);
        let color = if seen { RGBColor(31, 119, 180) } else { RGBColor(255, 127, 14) };
        chart.draw_series([Rectangle::new([(x - 0.4, 0.0), (x, *b)], RGBColor(170, 170, 170).filled())])?;
        chart.draw_series([Rectangle::new([(x, 0.0), (x + 0.4, *a)], color.filled())])?;
    }
    Ok(())
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let values: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return (0.0, 100.0);
    }
    let pad = ((hi - lo) * 0.1).max(2.0);
    ((lo - pad).max(0.0), (hi + pad).min(100.0))
}
