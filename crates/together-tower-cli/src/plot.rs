//! `--plot`: 2xx answers per second over time, against the client's quota and the server's
//! limit, with the rate in force and the refusals marked.

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::CliError;
use crate::bench::Timeline;

/// The chart drawn on: seconds across, a rate per second up.
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws the run, in one-second bins, to an SVG file.
pub fn draw(path: &Path, timeline: &Timeline, quota_rpm: u32) -> Result<(), CliError> {
    let (ok, refused) = per_second(timeline);
    let seconds = ok.len();
    let quota = f64::from(quota_rpm) / 60.0;
    let highest_rate = timeline
        .rates
        .iter()
        .chain(&timeline.server_rates)
        .map(|(_, rate)| *rate)
        .fold(quota, f64::max);
    let top = ok.iter().chain(&refused).copied().max().unwrap_or(0).max(1) as f64;
    let top = top.max(highest_rate) * 1.2;
    let failed = |error: &dyn std::fmt::Display| {
        CliError::Io(format!("cannot draw {}: {error}", path.display()))
    };
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|error| failed(&error))?;
    let mut chart = frame(&root, seconds as f64, top).map_err(|error| failed(&error))?;
    let quota_line = vec![(0.0, quota), (seconds as f64, quota)];
    line(
        &mut chart,
        quota_line,
        GREEN.stroke_width(3),
        format!("quota ({quota_rpm}/min)"),
    )
    .map_err(|error| failed(&error))?;
    if !timeline.server_rates.is_empty() {
        line(
            &mut chart,
            server_steps(timeline),
            BLACK.stroke_width(2),
            "server's limit".into(),
        )
        .map_err(|error| failed(&error))?;
    }
    if !timeline.rates.is_empty() {
        let rates = timeline
            .rates
            .iter()
            .map(|(at, rate)| (at.as_secs_f64(), *rate));
        line(
            &mut chart,
            rates.collect(),
            MAGENTA.stroke_width(2),
            "rate in force".into(),
        )
        .map_err(|error| failed(&error))?;
    }
    line(
        &mut chart,
        centred(&ok),
        BLUE.stroke_width(2),
        "2xx per second".into(),
    )
    .map_err(|error| failed(&error))?;
    tenant_lines(&mut chart, timeline, seconds).map_err(|error| failed(&error))?;
    rate_changes(&mut chart, timeline, top).map_err(|error| failed(&error))?;
    let marks = centred(&refused).into_iter().filter(|&(_, n)| n > 0.0);
    chart
        .draw_series(marks.map(|point| Circle::new(point, 4, RED.filled())))
        .map_err(|error| failed(&error))?
        .label("429s and 503s per second")
        .legend(|(x, y)| Circle::new((x + 8, y), 4, RED.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|error| failed(&error))?;
    root.present().map_err(|error| failed(&error))?;
    Ok(())
}

/// With `--tenants`: each tenant's 2xx answers per second, a line each.
fn tenant_lines(
    chart: &mut Chart<'_, '_>,
    timeline: &Timeline,
    seconds: usize,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    for (index, (name, answers)) in timeline.tenants.iter().enumerate() {
        let mut counts = vec![0u32; seconds.max(1)];
        for at in answers {
            if let Some(count) = counts.get_mut(at.as_secs() as usize) {
                *count += 1;
            }
        }
        let color = Palette99::pick(index + 3).stroke_width(2);
        line(
            chart,
            centred(&counts),
            color,
            format!("{name}: 2xx per second"),
        )?;
    }
    Ok(())
}

/// Marks each change of the rate in force along the top of the chart, by its reason.
fn rate_changes(
    chart: &mut Chart<'_, '_>,
    timeline: &Timeline,
    top: f64,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let reasons: [(&str, RGBColor, f64); 4] = [
        ("stated", BLACK, 0.96),
        ("429", RED, 0.92),
        ("503 trial", RGBColor(230, 120, 0), 0.88),
        ("503 noise", CYAN, 0.84),
    ];
    for (reason, color, height) in reasons {
        let marks: Vec<(f64, f64)> = timeline
            .rate_changes
            .iter()
            .filter(|(_, why)| *why == reason)
            .map(|(at, _)| (at.as_secs_f64(), top * height))
            .collect();
        if marks.is_empty() {
            continue;
        }
        chart
            .draw_series(
                marks
                    .into_iter()
                    .map(|point| TriangleMarker::new(point, 5, color.filled())),
            )?
            .label(format!("rate change: {reason}"))
            .legend(move |(x, y)| TriangleMarker::new((x + 8, y), 5, color.filled()));
    }
    Ok(())
}

/// The chart's frame: caption, axes and grid, `seconds` across and `top` up.
fn frame<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    seconds: f64,
    top: f64,
) -> Result<Chart<'a, 'b>, DrawingAreaErrorKind<std::io::Error>> {
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Requests per second (2xx) against the limits; 429s and 503s in red",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..seconds, 0f64..top)?;
    chart
        .configure_mesh()
        // Only the bold grid: the fine one, drawn by opacity, turns solid in some renderers.
        .light_line_style(TRANSPARENT)
        .bold_line_style(BLACK.mix(0.15))
        .x_desc("seconds")
        .y_desc("per second")
        .draw()?;
    Ok(chart)
}

/// The 2xx answers and the refusals (429 and 503) of each second of the run.
fn per_second(timeline: &Timeline) -> (Vec<u32>, Vec<u32>) {
    let attempts = &timeline.attempts;
    let seconds = attempts
        .iter()
        .map(|attempt| attempt.at.as_secs() as usize + 1)
        .max()
        .unwrap_or(1);
    let mut ok = vec![0u32; seconds];
    let mut refused = vec![0u32; seconds];
    for attempt in attempts {
        let second = attempt.at.as_secs() as usize;
        match attempt.status {
            Some(200..=299) => ok[second] += 1,
            Some(429 | 503) => refused[second] += 1,
            _ => {}
        }
    }
    (ok, refused)
}

/// Counts per second, each at the middle of its second.
fn centred(counts: &[u32]) -> Vec<(f64, f64)> {
    counts
        .iter()
        .enumerate()
        .map(|(i, &n)| (i as f64 + 0.5, f64::from(n)))
        .collect()
}

/// The server's limit as steps, since it changes at an instant.
fn server_steps(timeline: &Timeline) -> Vec<(f64, f64)> {
    let mut steps = Vec::new();
    let mut previous: Option<f64> = None;
    for (at, rate) in &timeline.server_rates {
        if let Some(previous) = previous {
            steps.push((at.as_secs_f64(), previous));
        }
        steps.push((at.as_secs_f64(), *rate));
        previous = Some(*rate);
    }
    steps
}

/// Draws a labelled line.
fn line(
    chart: &mut Chart<'_, '_>,
    points: Vec<(f64, f64)>,
    style: ShapeStyle,
    label: String,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    chart
        .draw_series(LineSeries::new(points, style))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
    Ok(())
}
