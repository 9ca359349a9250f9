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
    /// The goal this ratio is held to, as text (e.g. "<= 2.0"), or for a ratio printed as
    /// context for others, what it shows.
    pub goal: String,
    /// Whether the goal was met; `None` for a context ratio, which has no goal.
    pub met: Option<bool>,
}

impl Ratio {
    pub fn new(name: &str, value: f64, goal: &str, met: impl Fn(f64) -> bool) -> Ratio {
        Ratio {
            name: name.to_string(),
            value,
            goal: goal.to_string(),
            met: Some(met(value)),
        }
    }

    /// A ratio with no goal of its own that bounds or explains others (e.g. what the baseline
    /// costs over the floor): printed with `shows` instead of a verdict.
    pub fn context(name: &str, value: f64, shows: &str) -> Ratio {
        Ratio {
            name: name.to_string(),
            value,
            goal: shows.to_string(),
            met: None,
        }
    }

    /// "goal <= 1.2: met", or what a context ratio shows.
    fn verdict(&self) -> String {
        match self.met {
            Some(true) => format!("goal {}: met", self.goal),
            Some(false) => format!("goal {}: NOT met", self.goal),
            None => format!("({})", self.goal),
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
        println!("{:<name$} {:>10.2}×  {}", r.name, r.value, r.verdict());
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

/// One panel per kind of phase (cold start; HTTP; anything else), each with horizontal bars of
/// p50 (solid) and p99 (outline) per phase, one bar per label and the label at its bar's centre,
/// on a log scale so microsecond restores and second-long baselines fit; then the ratios, each
/// with its goal and whether it was met.
pub fn write_svg(report: &Report, path: &Path) -> Result<()> {
    let mut panels: Vec<(&str, Vec<&Summary>)> = Vec::new();
    for phase in &report.phases {
        let title = panel_of(&phase.phase);
        match panels.iter_mut().find(|(t, _)| *t == title) {
            Some((_, phases)) => phases.push(phase),
            None => panels.push((title, vec![phase])),
        }
    }
    const ROW: u32 = 34;
    const PANEL_CHROME: u32 = 90;
    const RATIO_LINE: u32 = 20;
    let panel_heights: Vec<u32> = panels
        .iter()
        .map(|(_, phases)| PANEL_CHROME + ROW * phases.len() as u32)
        .collect();
    let ratios_height = 50 + RATIO_LINE * report.ratios.len() as u32;
    let height = 50 + panel_heights.iter().sum::<u32>() + ratios_height;
    let root = SVGBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!("edged bench — {} on {}", report.guest, report.host),
        ("sans-serif", 22),
    )?;
    let mut rest = root;
    for ((title, phases), panel_height) in panels.iter().zip(&panel_heights) {
        let (area, below) = rest.split_vertically(*panel_height);
        draw_panel(&area, title, phases)?;
        rest = below;
    }
    draw_ratios(&rest, report)?;
    rest.present()?;
    Ok(())
}

/// Which panel a phase is drawn in, from its name's prefix.
fn panel_of(phase: &str) -> &'static str {
    if phase.starts_with("http") {
        "HTTP request latency (load generator on loopback)"
    } else if phase.starts_with("sync") || phase.starts_with("fleet") {
        "fleet sync"
    } else if phase.starts_with("soak") {
        "soak"
    } else {
        "cold start (in process)"
    }
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    phases: &[&Summary],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let rows = phases.len();
    let max = phases
        .iter()
        .map(|p| p.p99_us.max(p.p50_us))
        .fold(1.0, f64::max);
    let min = phases
        .iter()
        .map(|p| p.p50_us)
        .fold(f64::MAX, f64::min)
        .max(0.1);
    let base = min / 2.0;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{title} — p50 bar, p99 outline (µs, log scale)"),
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(360)
        .build_cartesian_2d((base..max * 2.0).log_scale(), (0..rows).into_segmented())?;
    let names: Vec<String> = phases.iter().map(|p| p.phase.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows)
        .y_label_formatter(&|value| match value {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("microseconds")
        .draw()?;
    for (i, p) in phases.iter().enumerate() {
        let (top, bottom) = (SegmentValue::Exact(i), SegmentValue::Exact(i + 1));
        chart.draw_series(std::iter::once(Rectangle::new(
            [(base, top.clone()), (p.p50_us, bottom.clone())],
            BLUE.mix(0.6).filled(),
        )))?;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(base, top), (p.p99_us, bottom)],
            BLACK.stroke_width(1),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{} / {}", format_us(p.p50_us), format_us(p.p99_us)),
            (p.p99_us.max(p.p50_us) * 1.05, SegmentValue::CenterOf(i)),
            ("sans-serif", 12),
        )))?;
    }
    Ok(())
}

fn draw_ratios<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    report: &Report,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    area.draw(&Text::new(
        "Ratios (measured in this run; quote these, not absolute times)",
        (20, 15),
        ("sans-serif", 16),
    ))?;
    for (i, r) in report.ratios.iter().enumerate() {
        let color = if r.met == Some(false) { RED } else { BLACK };
        let line = format!("{:>8.2}×   {}   {}", r.value, r.name, r.verdict());
        area.draw(&Text::new(
            line,
            (20, 40 + 20 * i as i32),
            ("monospace", 13).into_font().color(&color),
        ))?;
    }
    Ok(())
}
