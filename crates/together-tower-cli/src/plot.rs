//! `--plot`: 2xx answers per second over time, against the client's quota and the server's
//! limit, with the rate in force and the refusals marked.

use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

use crate::CliError;
use crate::bench::Timeline;

/// Draws the run, in one-second bins, to an SVG file.
pub fn draw(path: &Path, timeline: &Timeline, quota_rpm: u32) -> Result<(), CliError> {
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
    let secs = |at: &Duration| at.as_secs_f64();

    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|error| failed(&error))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Requests per second (2xx) against the limits; 429s and 503s in red",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..seconds as f64, 0f64..top)
        .map_err(|error| failed(&error))?;
    chart
        .configure_mesh()
        // Only the bold grid: the fine one, drawn by opacity, turns solid in some renderers.
        .light_line_style(TRANSPARENT)
        .bold_line_style(BLACK.mix(0.15))
        .x_desc("seconds")
        .y_desc("per second")
        .draw()
        .map_err(|error| failed(&error))?;
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, quota), (seconds as f64, quota)],
            GREEN.stroke_width(3),
        ))
        .map_err(|error| failed(&error))?
        .label(format!("quota ({quota_rpm}/min)"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GREEN.stroke_width(3)));
    if !timeline.server_rates.is_empty() {
        // Drawn as steps, since the server's limit changes at an instant.
        let mut steps = Vec::new();
        let mut previous: Option<f64> = None;
        for (at, rate) in &timeline.server_rates {
            if let Some(previous) = previous {
                steps.push((secs(at), previous));
            }
            steps.push((secs(at), *rate));
            previous = Some(*rate);
        }
        chart
            .draw_series(LineSeries::new(steps, BLACK.stroke_width(2)))
            .map_err(|error| failed(&error))?
            .label("server's limit")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(2)));
    }
    if !timeline.rates.is_empty() {
        let rates = timeline.rates.iter().map(|(at, rate)| (secs(at), *rate));
        chart
            .draw_series(LineSeries::new(rates, MAGENTA.stroke_width(2)))
            .map_err(|error| failed(&error))?
            .label("rate in force")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], MAGENTA.stroke_width(2)));
    }
    let per_second = |counts: &[u32]| -> Vec<(f64, f64)> {
        counts
            .iter()
            .enumerate()
            .map(|(i, &n)| (i as f64 + 0.5, f64::from(n)))
            .collect()
    };
    chart
        .draw_series(LineSeries::new(per_second(&ok), BLUE.stroke_width(2)))
        .map_err(|error| failed(&error))?
        .label("2xx per second")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    let marks: Vec<(f64, f64)> = per_second(&refused)
        .into_iter()
        .filter(|&(_, n)| n > 0.0)
        .collect();
    chart
        .draw_series(
            marks
                .into_iter()
                .map(|point| Circle::new(point, 4, RED.filled())),
        )
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
