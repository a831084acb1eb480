//! `curves.svg`: loss and eval loss, learning rate and gradient norm by step, drawn from
//! `metrics.jsonl` so a resumed run's picture covers the whole run.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use crate::error::{Result, failed};
use crate::output::AtomicFile;

type Series = Vec<(f64, f64)>;

fn series(records: &[Value], key: &str) -> Series {
    records
        .iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

fn bounds(all: &[&Series]) -> Option<((f64, f64), (f64, f64))> {
    let points: Vec<&(f64, f64)> = all.iter().flat_map(|s| s.iter()).collect();
    if points.is_empty() {
        return None;
    }
    let fold = |f: fn(&(f64, f64)) -> f64| {
        points.iter().map(|p| f(p)).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
    };
    let (x0, x1) = fold(|p| p.0);
    let (y0, y1) = fold(|p| p.1);
    let pad = ((y1 - y0) * 0.05).max(1e-12);
    Some(((x0, x1.max(x0 + 1.0)), (y0 - pad, y1 + pad)))
}

fn panel(area: &DrawingArea<SVGBackend, plotters::coord::Shift>, title: &str, lines: &[(&str, &Series, RGBColor)]) -> Result<()> {
    let all: Vec<&Series> = lines.iter().map(|(_, s, _)| *s).collect();
    let Some((xs, ys)) = bounds(&all) else { return Ok(()) };
    let draw = |e: &dyn std::fmt::Display| failed(format!("drawing curves: {e}"));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .margin_right(30)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| draw(&e))?;
    for (label, points, color) in lines {
        if points.is_empty() {
            continue;
        }
        let color = *color;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    if lines.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw(&e))?;
    }
    Ok(())
}

/// Draw `curves.svg` from the records of `metrics.jsonl`.
pub fn draw(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)?;
    let records: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let (loss, eval_loss) = (series(&records, "loss"), series(&records, "eval_loss"));
    let (lr, grad_norm) = (series(&records, "learning_rate"), series(&records, "grad_norm"));
    let file = AtomicFile::create(out)?;
    {
        let root = SVGBackend::new(file.path(), (1100, 760)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(format!("drawing curves: {e}")))?;
        let (top, bottom) = root.split_vertically(430);
        let (lr_area, norm_area) = bottom.split_horizontally(550);
        panel(&top, "loss", &[("train loss", &loss, BLUE), ("eval loss", &eval_loss, RED)])?;
        panel(&lr_area, "learning rate", &[("learning rate", &lr, GREEN)])?;
        panel(&norm_area, "gradient norm (before clipping)", &[("grad norm", &grad_norm, MAGENTA)])?;
        root.present().map_err(|e| failed(format!("drawing curves: {e}")))?;
    }
    file.commit()
}
