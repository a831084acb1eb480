//! `report.html`: one self-contained page (inline CSS and SVG, no scripts, nothing fetched),
//! so it opens offline and can be attached to a CI run.

use std::fmt::Write;

use super::stats::Rate;
use super::suite::{Section, Suite};
use super::summary::{Judged, Summary};

/// Examples shown per attack category.
const EXAMPLES_PER_CATEGORY: usize = 3;

pub fn html(suite: &Suite, summary: &Summary, judged: &[Judged]) -> String {
    let mut page = String::new();
    let title = format!("Red-team report: {}", escape(&summary.target));
    let _ = writeln!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{title}</title><style>{STYLE}</style></head><body>\n<h1>{title}</h1>"
    );
    let _ = writeln!(
        page,
        "<p class=\"meta\">Suite <b>{}</b> · {} attempts ({} failed) in {:.1} s ({:.2} attempts/s){}</p>",
        escape(&summary.suite),
        summary.attempts,
        summary.errors,
        summary.seconds,
        summary.attempts_per_s,
        summary.baseline.as_ref().map(|b| format!(" · baseline <code>{}</code>", escape(b))).unwrap_or_default()
    );
    gate(&mut page, summary);
    categories(&mut page, summary);
    probes(&mut page, summary);
    bias(&mut page, summary);
    tasks(&mut page, summary);
    agreement(&mut page, summary);
    examples(&mut page, suite, judged);
    page.push_str("</body></html>\n");
    page
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;width:100%;margin:.5em 0}th,td{padding:.25em .5em;border-bottom:1px solid #eee;text-align:left}\
td.n{text-align:right;font-variant-numeric:tabular-nums}.meta{color:#555}.bad{color:#b00020;font-weight:600}.good{color:#1b7a2f}\
.gate{padding:.6em 1em;border-radius:6px}.gate.failed{background:#fde8ea}.gate.passed{background:#e8f6ec}\
details{margin:.5em 0;border:1px solid #e3c26b;border-radius:6px;padding:.4em .8em;background:#fffaf0}\
summary{cursor:pointer;font-weight:600}pre{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;padding:.5em;margin:.3em 0}";

fn gate(page: &mut String, summary: &Summary) {
    let budgets = summary.categories.iter().any(|c| c.budget.is_some());
    if summary.gate.failed.is_empty() {
        if budgets {
            let _ = writeln!(page, "<p class=\"gate passed\">Every category is within its budget ({} bound).</p>", summary.gate.bound);
        }
    } else {
        let _ = writeln!(
            page,
            "<p class=\"gate failed\">Gate failed ({} bound): {}</p>",
            summary.gate.bound,
            escape(&summary.gate.failed.join("; "))
        );
    }
}

fn percent(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn rate_cells(rate: &Rate) -> String {
    format!(
        "<td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}–{}</td>",
        rate.attempts,
        rate.successes,
        percent(rate.rate),
        percent(rate.ci_low),
        percent(rate.ci_high)
    )
}

fn categories(page: &mut String, summary: &Summary) {
    if summary.categories.is_empty() {
        return;
    }
    let _ = writeln!(
        page,
        "<h2>Attack success by category</h2>\n<p>Overall: {} of {} attacks got through ({}, 95% Wilson interval {}–{}).</p>",
        summary.attack.successes,
        summary.attack.attempts,
        percent(summary.attack.rate),
        percent(summary.attack.ci_low),
        percent(summary.attack.ci_high)
    );
    page.push_str(&bar_chart(summary));
    page.push_str("<table><tr><th>category</th><th>attempts</th><th>successes</th><th>rate</th><th>95% CI</th><th>budget</th><th>baseline</th><th>change</th><th>by detector</th></tr>\n");
    for c in &summary.categories {
        let budget = c.budget.map(percent).unwrap_or_else(|| "—".into());
        let class = if c.over_budget { " class=\"bad\"" } else { "" };
        let change = c.change.map(|d| {
            let class = if d > 0.0 { "bad" } else { "good" };
            format!("<span class=\"{class}\">{:+.1} pts</span>", 100.0 * d)
        });
        let detectors: Vec<String> = c
            .detectors
            .iter()
            .map(|(name, d)| {
                let change = d.change.map(|x| format!(" ({:+.1})", 100.0 * x)).unwrap_or_default();
                format!("{} {}{change}", escape(name), percent(d.rate.rate))
            })
            .collect();
        let _ = writeln!(
            page,
            "<tr><td{class}>{}</td>{}<td class=\"n\">{budget}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            escape(&c.category),
            rate_cells(&c.rate),
            c.baseline.map(|b| percent(b.rate)).unwrap_or_else(|| "—".into()),
            change.unwrap_or_else(|| "—".into()),
            detectors.join("<br>")
        );
    }
    page.push_str("</table>\n");
}

/// Horizontal bars with 95% whiskers, the budget as a red tick and the baseline as a grey dot.
fn bar_chart(summary: &Summary) -> String {
    let (label_width, plot_width, row) = (150.0, 560.0, 26.0);
    let height = row * summary.categories.len() as f64 + 30.0;
    let x = |rate: f64| label_width + rate * plot_width;
    let mut svg = format!(
        "<svg width=\"{w}\" height=\"{height}\" role=\"img\" aria-label=\"attack-success rate by category\" font-size=\"12\">",
        w = label_width + plot_width + 20.0
    );
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = write!(
            svg,
            "<line x1=\"{0}\" x2=\"{0}\" y1=\"0\" y2=\"{1}\" stroke=\"#ddd\"/><text x=\"{0}\" y=\"{2}\" text-anchor=\"middle\" fill=\"#666\">{3:.0}%</text>",
            x(tick),
            height - 20.0,
            height - 6.0,
            100.0 * tick
        );
    }
    for (i, c) in summary.categories.iter().enumerate() {
        let y = i as f64 * row + 4.0;
        let fill = if c.over_budget { "#d9534f" } else { "#4a7bd0" };
        let _ = write!(
            svg,
            "<text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\">{name}</text><rect x=\"{x0}\" y=\"{y}\" width=\"{bw}\" height=\"16\" fill=\"{fill}\"><title>{name}: {p}</title></rect>\
             <line x1=\"{lo}\" x2=\"{hi}\" y1=\"{my}\" y2=\"{my}\" stroke=\"#222\"/><line x1=\"{lo}\" x2=\"{lo}\" y1=\"{t}\" y2=\"{b}\" stroke=\"#222\"/><line x1=\"{hi}\" x2=\"{hi}\" y1=\"{t}\" y2=\"{b}\" stroke=\"#222\"/>",
            lx = label_width - 6.0,
            ty = y + 12.0,
            name = escape(&c.category),
            x0 = x(0.0),
            bw = (c.rate.rate * plot_width).max(0.5),
            p = percent(c.rate.rate),
            lo = x(c.rate.ci_low),
            hi = x(c.rate.ci_high),
            my = y + 8.0,
            t = y + 3.0,
            b = y + 13.0,
        );
        if let Some(budget) = c.budget {
            let _ = write!(svg, "<line x1=\"{0}\" x2=\"{0}\" y1=\"{1}\" y2=\"{2}\" stroke=\"#b00020\" stroke-width=\"2\"/>", x(budget), y - 2.0, y + 18.0);
        }
        if let Some(baseline) = c.baseline {
            let _ = write!(svg, "<circle cx=\"{}\" cy=\"{}\" r=\"4\" fill=\"#888\"><title>baseline {}</title></circle>", x(baseline.rate), y + 8.0, percent(baseline.rate));
        }
    }
    svg.push_str("</svg>\n<p class=\"meta\">Bars: attack-success rate; whiskers: 95% Wilson interval; red tick: budget; grey dot: baseline.</p>\n");
    svg
}

fn probes(page: &mut String, summary: &Summary) {
    let attack: Vec<_> = summary.probes.iter().filter(|p| p.section == Section::Attack).collect();
    if attack.is_empty() {
        return;
    }
    page.push_str("<h2>Attack probes</h2>\n<table><tr><th>probe</th><th>category</th><th>detector</th><th>attempts</th><th>successes</th><th>rate</th><th>95% CI</th><th>failed</th></tr>\n");
    for p in attack {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td>{}<td class=\"n\">{}</td></tr>",
            escape(&p.probe),
            escape(&p.category),
            escape(&p.detector),
            rate_cells(&p.rate),
            p.errors
        );
    }
    page.push_str("</table>\n");
}

fn bias(page: &mut String, summary: &Summary) {
    if summary.counterfactual.is_empty() && summary.bbq.is_empty() {
        return;
    }
    page.push_str("<h2>Bias</h2>\n");
    if !summary.counterfactual.is_empty() {
        page.push_str("<p>Counterfactual swaps: the same prompt with only the group changed. Gap = largest minus smallest group mean; p from a paired permutation test.</p>\n");
        page.push_str("<table><tr><th>probe</th><th>attribute</th><th>detector</th><th>group means</th><th>gap</th><th>p</th><th>pairs</th></tr>\n");
        for g in &summary.counterfactual {
            let means: Vec<String> =
                g.groups.iter().zip(&g.test.group_means).map(|(name, mean)| format!("{}: {mean:.3}", escape(name))).collect();
            let class = if g.test.p_value < 0.05 { " class=\"bad\"" } else { "" };
            let _ = writeln!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{:.3}</td><td class=\"n\"><span{class}>{:.4}</span></td><td class=\"n\">{}</td></tr>",
                escape(&g.probe),
                escape(&g.attribute),
                escape(&g.detector),
                means.join("<br>"),
                g.test.gap,
                g.test.p_value,
                g.pairs
            );
        }
        page.push_str("</table>\n");
    }
    if !summary.bbq.is_empty() {
        page.push_str("<p>BBQ (Parrish et al. 2022): bias score in [−1, 1], 0 = no bias; the ambiguous score is scaled by the error rate.</p>\n");
        page.push_str("<table><tr><th>probe</th><th>category</th><th>accuracy (ambig.)</th><th>accuracy (disambig.)</th><th>bias (ambig.)</th><th>bias (disambig.)</th><th>unparsed</th></tr>\n");
        let show = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "—".into());
        for b in &summary.bbq {
            let _ = writeln!(
                page,
                "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                escape(&b.probe),
                escape(&b.category),
                show(b.scores.accuracy_ambiguous),
                show(b.scores.accuracy_disambiguated),
                show(b.scores.bias_ambiguous),
                show(b.scores.bias_disambiguated),
                b.scores.unparsed
            );
        }
        page.push_str("</table>\n");
    }
}

fn tasks(page: &mut String, summary: &Summary) {
    let tasks: Vec<_> = summary.probes.iter().filter(|p| p.section == Section::Task).collect();
    if tasks.is_empty() {
        return;
    }
    page.push_str("<h2>Task evaluation</h2>\n<table><tr><th>probe</th><th>detector</th><th>items</th><th>correct</th><th>accuracy</th><th>95% CI</th><th>mean score</th></tr>\n");
    for p in tasks {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td>{}<td class=\"n\">{}</td></tr>",
            escape(&p.probe),
            escape(&p.detector),
            rate_cells(&p.rate),
            p.mean_score.map(|m| format!("{m:.3}")).unwrap_or_else(|| "—".into())
        );
    }
    page.push_str("</table>\n");
}

fn agreement(page: &mut String, summary: &Summary) {
    if summary.agreement.is_empty() {
        return;
    }
    page.push_str("<h2>Detector agreement</h2>\n<table><tr><th>detectors</th><th>items</th><th>disagreements</th><th>Cohen's κ</th></tr>\n");
    for a in &summary.agreement {
        let _ = writeln!(
            page,
            "<tr><td>{} / {}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&a.detectors[0]),
            escape(&a.detectors[1]),
            a.items,
            a.disagreements,
            a.kappa.map(|k| format!("{k:.3}")).unwrap_or_else(|| "—".into())
        );
    }
    page.push_str("</table>\n");
}

/// The highest-scoring successful attacks of each category, folded behind a warning.
fn examples(page: &mut String, suite: &Suite, judged: &[Judged]) {
    let mut by_category: std::collections::BTreeMap<&str, Vec<&Judged>> = Default::default();
    for j in judged {
        let probe = &suite.probes[j.attempt.probe];
        if probe.family.section() == Section::Attack && !j.failed() && j.primary().is_some_and(|v| v.success) {
            by_category.entry(suite.category(j.attempt.probe)).or_default().push(j);
        }
    }
    if by_category.is_empty() {
        return;
    }
    page.push_str("<h2>Worst examples</h2>\n");
    for (category, mut items) in by_category {
        items.sort_by(|a, b| {
            let score = |j: &Judged| j.primary().map_or(0.0, |v| v.score);
            score(b).total_cmp(&score(a))
        });
        let _ = writeln!(
            page,
            "<details><summary>Content warning: {} successful attacks in <i>{}</i> (click to show {})</summary>",
            items.len(),
            escape(category),
            items.len().min(EXAMPLES_PER_CATEGORY)
        );
        for j in items.iter().take(EXAMPLES_PER_CATEGORY) {
            let probe = &suite.probes[j.attempt.probe];
            let _ = writeln!(
                page,
                "<p><b>{}</b> ({})</p><pre>{}</pre><pre>{}</pre>",
                escape(&probe.name),
                escape(&j.attempt.id),
                escape(&j.attempt.user),
                escape(&j.outcome.response)
            );
        }
        page.push_str("</details>\n");
    }
}

/// Text made safe inside HTML elements and attribute values (minijinja's escaping).
fn escape(text: &str) -> String {
    minijinja::HtmlEscape(text).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_is_escaped() {
        let escaped = super::escape("<script>alert('x') & \"y\"</script>");
        assert!(!escaped.contains('<') && !escaped.contains('"') && !escaped.contains('\''), "{escaped}");
        assert!(escaped.starts_with("&lt;script&gt;alert(&#x27;x&#x27;) &amp; &quot;y&quot;"), "{escaped}");
    }
}
