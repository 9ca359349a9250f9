//! Writing results: a table on stdout, JSON, and an SVG chart of p50/p99 per phase.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;

use crate::stats::{Summary, format_us};

#[derive(Debug, Serialize)]
pub struct Ratio {
    pub name: String,
    pub value: f64,
    /// The goal this ratio is held to, as text (e.g. "<= 2.0").
    pub goal: String,
    pub met: bool,
}

impl Ratio {
    pub fn new(name: &str, value: f64, goal: &str, met: impl Fn(f64) -> bool) -> Ratio {
        Ratio {
            name: name.to_string(),
            value,
            goal: goal.to_string(),
            met: met(value),
        }
    }
}

/// A single figure that is not a latency distribution (throughput, memory).
#[derive(Debug, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub guest: String,
    pub host: String,
    pub note: String,
    pub phases: Vec<Summary>,
    pub ratios: Vec<Ratio>,
    pub figures: Vec<Figure>,
}

pub fn print(report: &Report) {
    println!(
        "edged cold-start bench — guest {} on {}",
        report.guest, report.host
    );
    if !report.note.is_empty() {
        println!("{}", report.note);
    }
    let phase = column(report.phases.iter().map(|p| p.phase.as_str()), 34);
    println!(
        "{:<phase$} {:>7} {:>12} {:>12} {:>12}",
        "phase", "n", "p50", "p99", "max"
    );
    for p in &report.phases {
        println!(
            "{:<phase$} {:>7} {:>12} {:>12} {:>12}",
            p.phase,
            p.samples,
            format_us(p.p50_us),
            format_us(p.p99_us),
            format_us(p.max_us)
        );
    }
    let name = column(
        report
            .figures
            .iter()
            .map(|f| f.name.as_str())
            .chain(report.ratios.iter().map(|r| r.name.as_str())),
        58,
    );
    println!();
    for f in &report.figures {
        println!("{:<name$} {:>10.1} {}", f.name, f.value, f.unit);
    }
    println!();
    for r in &report.ratios {
        println!(
            "{:<name$} {:>10.2}×  goal {:<8} {}",
            r.name,
            r.value,
            r.goal,
            if r.met { "met" } else { "NOT met" }
        );
    }
}

/// A name column as wide as its longest name and at least `least`, so one long name does not
/// push its row's value out of line with the others.
fn column<'a>(names: impl Iterator<Item = &'a str>, least: usize) -> usize {
    names.map(|n| n.chars().count()).fold(least, usize::max)
}

pub fn write_json(report: &Report, path: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

/// Horizontal bars of p50 (solid) and p99 (outline) per phase, on a log scale so microsecond
/// restores and second-long baselines fit one chart.
pub fn write_svg(report: &Report, path: &Path) -> Result<()> {
    let rows = report.phases.len();
    let height = 120 + 40 * rows as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = report
        .phases
        .iter()
        .map(|p| p.p99_us.max(p.p50_us))
        .fold(1.0, f64::max);
    let min = report
        .phases
        .iter()
        .map(|p| p.p50_us)
        .fold(f64::MAX, f64::min)
        .max(0.1);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "edged — {} (p50 bar, p99 outline; µs, log scale)",
                report.guest
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(260)
        .build_cartesian_2d((min / 2.0..max * 2.0).log_scale(), 0..rows)?;
    let names: Vec<String> = report.phases.iter().map(|p| p.phase.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows)
        .y_label_formatter(&|i| names.get(*i).cloned().unwrap_or_default())
        .x_desc("microseconds")
        .draw()?;
    let base = min / 2.0;
    for (i, p) in report.phases.iter().enumerate() {
        chart.draw_series(std::iter::once(Rectangle::new(
            [(base, i), (p.p50_us, i + 1)],
            BLUE.mix(0.6).filled(),
        )))?;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(base, i), (p.p99_us, i + 1)],
            BLACK.stroke_width(1),
        )))?;
    }
    root.present()?;
    Ok(())
}
