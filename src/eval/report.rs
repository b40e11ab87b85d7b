//! Results of the eval harness gathered into rows (one per task, length and
//! variant), written as CSV, markdown tables and PNG plots.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::budget::BudgetTrace;
use super::fidelity::{summarize, wilson, Summary};
use super::harness::{Answer, Continuation};
use super::tasks::TaskKind;
use crate::kv::Policy;

/// A task is informative when the full cache scores at least this on it.
pub const INFORMATIVE: f64 = 0.5;

/// The task name of continuation rows (`eval kld`).
pub const CONTINUATION: &str = "kld";

/// Everything measured, as it comes in.
#[derive(Debug, Default)]
pub struct Results {
    /// Per (task, context length): every question's result under every variant.
    answers: BTreeMap<(TaskKind, usize), Vec<Answer>>,
    /// Per context length: every document's continuation under every variant.
    continuations: BTreeMap<usize, Vec<Continuation>>,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    pub task: &'static str,
    /// Context length in tokens.
    pub length: usize,
    pub policy: String,
    pub keep: f64,
    /// Questions (tasks) or documents (continuations) measured.
    pub n: usize,
    /// Mean answer score (tasks).
    pub accuracy: Option<Summary>,
    /// Fraction of the evidence's KV pairs kept (tasks).
    pub evidence_kept: Option<Summary>,
    /// KL(full || variant) per token: mean and CI over documents, percentiles over
    /// all tokens (continuations).
    pub kld: Option<Summary>,
    /// Agreement of the top-1 token with the full cache (continuations).
    pub top1: Option<Summary>,
    /// Change in NLL per token of the actual text (continuations).
    pub delta_nll: Option<Summary>,
    /// KV bytes held after compression / with the full cache, mean.
    pub kv_fraction: f64,
}

/// Rows read back from a sweep's `results.csv` (by column name, so files written
/// before a column was added still read). Percentiles other than KLD's, which the CSV
/// does not hold, come back as 0.
pub fn rows_from_csv(text: &str) -> Result<Vec<Row>, String> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().ok_or("empty CSV")?.split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let cells: Vec<&str> = line.split(',').collect();
        let bad = |what: &str| format!("line {}: bad or missing {what}", i + 2);
        let cell = |name: &str| col(name).and_then(|c| cells.get(c)).copied().unwrap_or("");
        let num = |name: &str| -> Result<Option<f64>, String> {
            match cell(name) {
                "" => Ok(None),
                v => v.parse().map(Some).map_err(|_| bad(name)),
            }
        };
        let n: usize = cell("n").parse().map_err(|_| bad("n"))?;
        let summary = |mean: &str, ci: &str| -> Result<Option<Summary>, String> {
            Ok(num(mean)?.map(|m| Summary {
                n,
                mean: m,
                ci95: num(ci).ok().flatten().unwrap_or(0.0),
                ..Summary::default()
            }))
        };
        let mut kld = summary("kld_mean", "kld_ci95")?;
        if let Some(k) = kld.as_mut() {
            k.p50 = num("kld_p50")?.unwrap_or(0.0);
            k.p90 = num("kld_p90")?.unwrap_or(0.0);
            k.p99 = num("kld_p99")?.unwrap_or(0.0);
        }
        let task = cell("task");
        rows.push(Row {
            task: TaskKind::ALL
                .iter()
                .map(|t| t.name())
                .chain([CONTINUATION])
                .find(|t| *t == task)
                .ok_or_else(|| bad("task"))?,
            length: cell("length").parse().map_err(|_| bad("length"))?,
            policy: cell("policy").to_string(),
            keep: num("keep")?.ok_or_else(|| bad("keep"))?,
            n,
            accuracy: summary("accuracy", "accuracy_ci95")?,
            evidence_kept: summary("evidence_kept", "evidence_kept_ci95")?,
            kld,
            top1: summary("top1", "top1_ci95")?,
            delta_nll: summary("delta_nll", "delta_nll_ci95")?,
            kv_fraction: num("kv_fraction")?.unwrap_or(0.0),
        });
    }
    Ok(rows)
}

/// `earlier` rows (read from a previous sweep's `results.csv`) with `newer` ones
/// added: a row measured again (same task, length, policy and keep) is replaced.
pub fn merge(earlier: Vec<Row>, newer: Vec<Row>) -> Vec<Row> {
    let key = |r: &Row| (r.task, r.length, r.policy.clone(), r.keep.to_bits());
    let mut out: Vec<Row> = earlier
        .into_iter()
        .filter(|r| !newer.iter().any(|n| key(n) == key(r)))
        .collect();
    out.extend(newer);
    out
}

impl Results {
    pub fn add_answers(&mut self, task: TaskKind, length: usize, a: Vec<Answer>) {
        self.answers.entry((task, length)).or_default().extend(a);
    }

    pub fn add_continuations(&mut self, length: usize, c: Vec<Continuation>) {
        self.continuations.entry(length).or_default().extend(c);
    }

    /// One row per task, length and variant, the full cache first in each group.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for (&(task, length), answers) in &self.answers {
            for v in dedup(answers.iter().map(|a| a.variant)) {
                let of_v: Vec<&Answer> = answers.iter().filter(|a| a.variant == v).collect();
                let scores: Vec<f64> = of_v.iter().map(|a| a.score).collect();
                rows.push(Row {
                    task: task.name(),
                    length,
                    policy: v.label(),
                    keep: v.keep,
                    n: scores.len(),
                    accuracy: Some(summarize(&scores)),
                    evidence_kept: Some(summarize(
                        &of_v.iter().map(|a| a.evidence_kept).collect::<Vec<_>>(),
                    )),
                    kld: None,
                    top1: None,
                    delta_nll: None,
                    kv_fraction: mean(of_v.iter().map(|a| kv_fraction(&a.compression))),
                });
            }
        }
        for (&length, conts) in &self.continuations {
            for v in dedup(conts.iter().map(|c| c.variant)) {
                let of_v: Vec<&Continuation> = conts.iter().filter(|c| c.variant == v).collect();
                let per_doc = |f: &dyn Fn(&super::fidelity::TokenFidelity) -> f64| -> Vec<f64> {
                    of_v.iter().map(|c| mean(c.tokens.iter().map(f))).collect()
                };
                let mut kld = summarize(&per_doc(&|t| t.kld));
                let pooled = summarize(
                    &of_v
                        .iter()
                        .flat_map(|c| c.tokens.iter().map(|t| t.kld))
                        .collect::<Vec<_>>(),
                );
                (kld.p50, kld.p90, kld.p99) = (pooled.p50, pooled.p90, pooled.p99);
                rows.push(Row {
                    task: CONTINUATION,
                    length,
                    policy: v.label(),
                    keep: v.keep,
                    n: of_v.len(),
                    accuracy: None,
                    evidence_kept: None,
                    kld: Some(kld),
                    top1: Some(summarize(&per_doc(&|t| f64::from(u8::from(t.same_top1))))),
                    delta_nll: Some(summarize(&per_doc(&|t| t.delta_nll))),
                    kv_fraction: mean(of_v.iter().map(|c| kv_fraction(&c.compression))),
                });
            }
        }
        rows
    }
}

fn mean(it: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = it.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

fn kv_fraction(r: &crate::session::CompressReport) -> f64 {
    if r.kv_bytes_full == 0 {
        1.0
    } else {
        r.kv_bytes as f64 / r.kv_bytes_full as f64
    }
}

/// The rows as CSV, one line per row.
pub fn csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "task,length,policy,keep,n,accuracy,accuracy_ci95,evidence_kept,kld_mean,kld_ci95,kld_p50,kld_p90,\
         kld_p99,top1,top1_ci95,delta_nll,delta_nll_ci95,kv_fraction,accuracy_lo,accuracy_hi,\
         evidence_kept_ci95\n",
    );
    let opt = |s: &Option<Summary>| match s {
        Some(s) => format!("{:.6},{:.6}", s.mean, s.ci95),
        None => ",".to_string(),
    };
    for r in rows {
        let pct = match &r.kld {
            Some(s) => format!("{:.6},{:.6},{:.6}", s.p50, s.p90, s.p99),
            None => ",,".to_string(),
        };
        let wilson_bounds = r.accuracy.map_or(",".to_string(), |a| {
            let (lo, hi) = wilson(a.mean, r.n);
            format!("{lo:.6},{hi:.6}")
        });
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{:.4},{},{}",
            r.task,
            r.length,
            r.policy,
            r.keep,
            r.n,
            opt(&r.accuracy),
            r.evidence_kept
                .map_or(String::new(), |e| format!("{:.4}", e.mean)),
            opt(&r.kld),
            pct,
            opt(&r.top1),
            opt(&r.delta_nll),
            r.kv_fraction,
            wilson_bounds,
            r.evidence_kept
                .map_or(String::new(), |e| format!("{:.4}", e.ci95)),
        );
    }
    out
}

/// The full cache's rows of the tasks, and which tasks are informative.
fn full_rows(rows: &[Row]) -> Vec<&Row> {
    rows.iter()
        .filter(|r| r.policy == Policy::Full.name() && r.accuracy.is_some())
        .collect()
}

/// Whether the full cache scores at least [`INFORMATIVE`] on (task, length).
pub fn informative(rows: &[Row], task: &str, length: usize) -> bool {
    full_rows(rows).iter().any(|r| {
        r.task == task && r.length == length && r.accuracy.is_some_and(|a| a.mean >= INFORMATIVE)
    })
}

/// Markdown tables: the full cache's accuracy per task and length; then, policy
/// by keep ratio, the accuracy over informative tasks, each informative task's
/// accuracy, and the continuation's KLD, top-1 agreement and delta NLL.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    let full = full_rows(rows);
    if !full.is_empty() {
        out.push_str("### Full cache accuracy\n\n| task | length | questions | accuracy [95% interval] | informative |\n|---|---|---|---|---|\n");
        for r in &full {
            let a = r.accuracy.expect("a task row");
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                r.task,
                r.length,
                r.n,
                Cell::proportion(a.mean, r.n).show(2, true),
                if a.mean >= INFORMATIVE { "yes" } else { "no" }
            );
        }
        out.push('\n');
    }
    for (title, table) in tables(rows) {
        let _ = writeln!(out, "### {title}\n");
        out.push_str(&table.to_markdown());
        out.push('\n');
    }
    out
}

/// A table cell: a mean and its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cell {
    mean: f64,
    lo: f64,
    hi: f64,
}

impl Cell {
    /// A proportion (accuracy) over `n` questions, with its Wilson interval.
    fn proportion(mean: f64, n: usize) -> Self {
        let (lo, hi) = wilson(mean, n);
        Self { mean, lo, hi }
    }

    /// A mean with a symmetric (normal-approximation) half-width.
    fn symmetric(mean: f64, ci: f64) -> Self {
        Self {
            mean,
            lo: mean - ci,
            hi: mean + ci,
        }
    }

    /// `0.83 [0.64, 0.93]` for proportions, `0.0556 ± 0.0121` otherwise.
    fn show(&self, digits: usize, interval: bool) -> String {
        let d = digits;
        if interval {
            format!("{:.d$} [{:.d$}, {:.d$}]", self.mean, self.lo, self.hi)
        } else {
            format!("{:.d$} ± {:.d$}", self.mean, (self.hi - self.lo) / 2.0)
        }
    }
}

/// A policy-by-keep table of one metric.
struct Table {
    keeps: Vec<f64>,
    /// Policy, then one cell per keep ratio (None: not measured).
    lines: Vec<(String, Vec<Option<Cell>>)>,
    /// Decimal places.
    digits: usize,
    /// Cells show their interval as [lo, hi] (proportions) rather than ± half-width.
    interval: bool,
}

impl Table {
    fn to_markdown(&self) -> String {
        let mut out = String::from("| policy |");
        for k in &self.keeps {
            let _ = write!(out, " keep {k} |");
        }
        out.push_str("\n|---|");
        out.push_str(&"---|".repeat(self.keeps.len()));
        out.push('\n');
        for (policy, cells) in &self.lines {
            let _ = write!(out, "| {policy} |");
            for c in cells {
                match c {
                    Some(c) => {
                        let _ = write!(out, " {} |", c.show(self.digits, self.interval));
                    }
                    None => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
        out
    }
}

/// The policy-by-keep tables, with their titles. The full cache's figure is the
/// keep 1.0 column of every policy (at keep 1.0 nothing is evicted).
fn tables(rows: &[Row]) -> Vec<(String, Table)> {
    let mut out = Vec::new();
    let lengths: Vec<usize> = dedup(rows.iter().map(|r| r.length));
    for &length in &lengths {
        let at: Vec<&Row> = rows.iter().filter(|r| r.length == length).collect();
        let tasks: Vec<&str> = dedup(at.iter().filter(|r| r.accuracy.is_some()).map(|r| r.task));
        let useful: Vec<&str> = tasks
            .iter()
            .copied()
            .filter(|t| informative(rows, t, length))
            .collect();
        if !useful.is_empty() {
            // Pool the questions of informative tasks: the weighted mean of their rows.
            let pooled = table(&at, 2, true, |rs| {
                let rs: Vec<&&Row> = rs.iter().filter(|r| useful.contains(&r.task)).collect();
                let n = rs.iter().map(|r| r.n).sum();
                pool(rs.iter().filter_map(|r| r.accuracy.map(|a| (r.n, a))))
                    .map(|(mean, _)| Cell::proportion(mean, n))
            });
            out.push((
                format!(
                    "Accuracy over informative tasks ({}), {length} tokens",
                    useful.join(", ")
                ),
                pooled,
            ));
            for t in &useful {
                let tbl = table(&at, 2, true, |rs| {
                    rs.iter()
                        .find(|r| r.task == *t)
                        .and_then(|r| r.accuracy.map(|a| Cell::proportion(a.mean, r.n)))
                });
                out.push((format!("Accuracy on {t}, {length} tokens"), tbl));
            }
            let kept = table(&at, 2, false, |rs| {
                let rs: Vec<&&Row> = rs.iter().filter(|r| useful.contains(&r.task)).collect();
                pool(rs.iter().filter_map(|r| r.evidence_kept.map(|e| (r.n, e))))
                    .map(|(m, ci)| Cell::symmetric(m, ci))
            });
            out.push((
                format!(
                    "Share of the evidence's KV pairs kept (informative tasks), {length} tokens"
                ),
                kept,
            ));
        }
        let cont: Vec<&Row> = at.iter().copied().filter(|r| r.kld.is_some()).collect();
        if !cont.is_empty() {
            let metric = |f: fn(&Row) -> Option<Summary>| {
                move |rs: &[&Row]| {
                    rs.first()
                        .and_then(|r| f(r).map(|s| Cell::symmetric(s.mean, s.ci95)))
                }
            };
            out.push((
                format!("Mean KLD (nats/token) vs the full cache, {length}-token contexts"),
                table(&cont, 4, false, metric(|r| r.kld)),
            ));
            out.push((
                format!("Top-1 agreement with the full cache, {length}-token contexts"),
                table(&cont, 3, false, metric(|r| r.top1)),
            ));
            out.push((
                format!("Delta NLL (nats/token) vs the full cache, {length}-token contexts"),
                table(&cont, 4, false, metric(|r| r.delta_nll)),
            ));
        }
    }
    // With the full cache alone there is nothing to compare.
    out.retain(|(_, t)| !t.lines.is_empty());
    out
}

/// A table over `rows` (one length): `cell` gets the rows of one policy and keep.
fn table(
    rows: &[&Row],
    digits: usize,
    interval: bool,
    cell: impl Fn(&[&Row]) -> Option<Cell>,
) -> Table {
    let keeps = keep_columns(rows);
    let full: Vec<&Row> = rows
        .iter()
        .copied()
        .filter(|r| r.policy == Policy::Full.name())
        .collect();
    let mut lines = Vec::new();
    for policy in dedup(rows.iter().map(|r| r.policy.as_str())) {
        if policy == Policy::Full.name() {
            continue;
        }
        let cells = keeps
            .iter()
            .map(|&k| {
                if k == 1.0 {
                    return cell(&full);
                }
                let rs: Vec<&Row> = rows
                    .iter()
                    .copied()
                    .filter(|r| r.policy == policy && r.keep == k)
                    .collect();
                if rs.is_empty() {
                    None
                } else {
                    cell(&rs)
                }
            })
            .collect();
        lines.push((policy.to_string(), cells));
    }
    Table {
        keeps,
        lines,
        digits,
        interval,
    }
}

/// Keep ratios, descending, with 1.0 (the full cache) first.
fn keep_columns(rows: &[&Row]) -> Vec<f64> {
    let mut keeps: Vec<f64> = rows.iter().map(|r| r.keep).collect();
    keeps.push(1.0);
    keeps.sort_by(|a, b| b.total_cmp(a));
    keeps.dedup();
    keeps
}

/// Combine summaries of groups of sizes n into the pooled mean and its CI.
fn pool(groups: impl Iterator<Item = (usize, Summary)>) -> Option<(f64, f64)> {
    let (mut n, mut sum, mut var_sum) = (0usize, 0.0, 0.0);
    for (k, s) in groups {
        n += k;
        sum += s.mean * k as f64;
        // ci95 = 1.96 sqrt(var / k): the group's contribution to the pooled variance.
        var_sum += (s.ci95 / 1.96).powi(2) * (k * k) as f64;
    }
    (n > 0).then(|| (sum / n as f64, 1.96 * var_sum.sqrt() / n as f64))
}

/// The distinct items, in order of first appearance.
fn dedup<T: PartialEq>(it: impl Iterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for x in it {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct PlotError {
    path: String,
    message: String,
}

/// Draw the plots into `dir` and return the names of the files written:
/// - per context length, `accuracy.png` (over informative tasks), `kld.png` and
///   `top1.png`: the metric against the keep ratio, one line per policy (with
///   several lengths the names carry the length: `accuracy_8192.png`);
/// - with several lengths, `accuracy_by_length.png` and `kld_by_length.png`: the
///   metric against the context length, one panel per keep ratio, one line per
///   policy and the full cache's for reference.
///
/// Every point carries its 95% interval (Wilson for accuracy).
pub fn plots(rows: &[Row], dir: &Path, title: &str) -> Result<Vec<String>, PlotError> {
    register_font();
    let lengths: Vec<usize> = dedup(rows.iter().map(|r| r.length));
    // (file stem, axis label, length, title, table) of every plotted table.
    let mut plotted: Vec<(&str, &str, usize, String, Table)> = Vec::new();
    for (title_of, tbl) in tables(rows) {
        let (stem, y_desc) = if title_of.starts_with("Accuracy over") {
            ("accuracy", "accuracy")
        } else if title_of.starts_with("Mean KLD") {
            ("kld", "mean KLD (nats/token)")
        } else if title_of.starts_with("Top-1") {
            ("top1", "top-1 agreement")
        } else {
            continue;
        };
        let length = lengths
            .iter()
            .copied()
            .find(|l| {
                title_of.ends_with(&format!(" {l} tokens"))
                    || title_of.ends_with(&format!(" {l}-token contexts"))
            })
            .unwrap_or(0);
        plotted.push((stem, y_desc, length, title_of, tbl));
    }
    let mut written = Vec::new();
    let mut by_metric: Vec<(&str, Vec<(usize, Table)>)> = Vec::new();
    for (stem, y_desc, length, title_of, tbl) in plotted.iter() {
        // With one length, `accuracy.png`; with several, one file per length.
        let several = plotted.iter().filter(|p| p.0 == *stem).count() > 1;
        let file = if several {
            format!("{stem}_{length}.png")
        } else {
            format!("{stem}.png")
        };
        let path = dir.join(&file);
        draw_by_keep(
            &path,
            &format!("{title}: {title_of}"),
            y_desc,
            tbl,
            *stem == "kld",
        )
        .map_err(|e| plot_error(&path, e))?;
        written.push(file);
    }
    for (stem, _, length, _, tbl) in plotted {
        if stem == "top1" {
            continue;
        }
        match by_metric.iter_mut().find(|(m, _)| *m == stem) {
            Some((_, v)) => v.push((length, tbl)),
            None => by_metric.push((stem, vec![(length, tbl)])),
        }
    }
    let several = by_metric.iter().any(|(_, v)| v.len() > 1);
    if several {
        for (stem, per_length) in by_metric {
            if per_length.len() < 2 {
                continue;
            }
            let file = format!("{stem}_by_length.png");
            let path = dir.join(&file);
            let (what, y_desc) = if stem == "accuracy" {
                ("accuracy over informative tasks", "accuracy")
            } else {
                ("mean KLD vs the full cache", "mean KLD (nats/token)")
            };
            draw_by_length(&path, &format!("{title}: {what}"), y_desc, &per_length)
                .map_err(|e| plot_error(&path, e))?;
            written.push(file);
        }
    }
    Ok(written)
}

fn plot_error(path: &Path, e: Box<dyn std::error::Error>) -> PlotError {
    PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Line colours that read well on white.
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 86, 86),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

/// The largest upper end of an interval in `cells`, with head room.
fn y_top<'a>(cells: impl Iterator<Item = &'a Cell>) -> f64 {
    cells.map(|c| c.hi).fold(0.0f64, f64::max).max(1e-6) * 1.1
}

/// One metric against the keep ratio: a line per policy, error bars at the points.
fn draw_by_keep(
    path: &Path,
    caption: &str,
    y_desc: &str,
    tbl: &Table,
    rises_left: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let y_max = y_top(tbl.lines.iter().flat_map(|(_, c)| c.iter().flatten()));
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0f64..1.05, 0.0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("keep ratio")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (policy, cells)) in tbl.lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, Cell)> = tbl
            .keeps
            .iter()
            .zip(cells)
            .filter_map(|(&k, c)| c.map(|c| (k, c)))
            .collect();
        draw_line(&mut chart, policy, color, &points, 0.004 * (i as f64 - 3.0))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        // Out of the way of the lines, which meet at keep 1.0.
        .position(if rises_left {
            SeriesLabelPosition::UpperRight
        } else {
            SeriesLabelPosition::LowerRight
        })
        .draw()?;
    root.present()?;
    Ok(())
}

/// A policy's line with its points and their intervals; `nudge` shifts it a little
/// sideways so that the intervals of lines that meet stay apart.
fn draw_line<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    label: &str,
    color: RGBColor,
    points: &[(f64, Cell)],
    nudge: f64,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let xy: Vec<(f64, f64)> = points.iter().map(|&(x, c)| (x + nudge, c.mean)).collect();
    chart
        .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))?
        .label(label.to_string())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    chart.draw_series(xy.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    chart.draw_series(points.iter().map(|&(x, c)| {
        ErrorBar::new_vertical(
            x + nudge,
            c.lo.max(0.0),
            c.mean,
            c.hi,
            color.stroke_width(1),
            8,
        )
    }))?;
    Ok(())
}

/// One metric against the context length (log scale), a panel per keep ratio below
/// 1: a line per policy, and the full cache's (keep 1.0) in every panel.
fn draw_by_length(
    path: &Path,
    caption: &str,
    y_desc: &str,
    per_length: &[(usize, Table)],
) -> Result<(), Box<dyn std::error::Error>> {
    let mut keeps: Vec<f64> = per_length
        .iter()
        .flat_map(|(_, t)| t.keeps.iter().copied())
        .filter(|&k| k < 1.0)
        .collect();
    keeps.sort_by(|a, b| b.total_cmp(a));
    keeps.dedup();
    let policies: Vec<String> = dedup(
        per_length
            .iter()
            .flat_map(|(_, t)| t.lines.iter().map(|(p, _)| p.clone())),
    );
    // (policy, keep) -> points (log2 length, cell); the full cache under "full".
    let series = |policy: &str, keep: f64| -> Vec<(f64, Cell)> {
        per_length
            .iter()
            .filter_map(|(len, t)| {
                let col = t.keeps.iter().position(|&k| k == keep)?;
                let line = if policy == Policy::Full.name() {
                    t.lines.first()
                } else {
                    t.lines.iter().find(|(p, _)| p == policy)
                }?;
                line.1[col].map(|c| ((*len as f64).log2(), c))
            })
            .collect()
    };
    let all: Vec<Cell> = per_length
        .iter()
        .flat_map(|(_, t)| {
            t.lines
                .iter()
                .flat_map(|(_, c)| c.iter().flatten().copied())
        })
        .collect();
    let y_max = y_top(all.iter());
    let xs: Vec<f64> = per_length.iter().map(|(l, _)| (*l as f64).log2()).collect();
    let (x_lo, x_hi) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min) - 0.3,
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max) + 0.3,
    );
    let cols = keeps.len().clamp(1, 2);
    let rows = keeps.len().div_ceil(cols).max(1);
    let root =
        BitMapBackend::new(path, (560 * cols as u32, 420 * rows as u32 + 40)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(caption, ("sans-serif", 20))?;
    let panels = root.split_evenly((rows, cols));
    for (panel, &keep) in panels.iter().zip(&keeps) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("keep {keep}"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x_lo..x_hi, 0.0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("context length (tokens)")
            .y_desc(y_desc)
            .x_labels(xs.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let l = 2f64.powf(*x).round() as usize;
                if (x.fract()).abs() < 1e-9 {
                    format!("{l}")
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 13))
            .draw()?;
        let full = series(Policy::Full.name(), 1.0);
        draw_line(&mut chart, "full", RGBColor(0, 0, 0), &full, 0.0)?;
        for (i, policy) in policies.iter().enumerate() {
            let points = series(policy, keep);
            if points.is_empty() {
                continue;
            }
            let color = PALETTE[i % PALETTE.len()];
            draw_line(
                &mut chart,
                policy,
                color,
                &points,
                0.03 * (i as f64 + 1.0 - policies.len() as f64 / 2.0),
            )?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// The name of a budget trace's session.
fn session_name(t: &BudgetTrace) -> String {
    t.variant
        .map_or_else(|| "full".to_string(), |v| v.to_string())
}

/// Per trace, the mean of `f` over each segment of `segment` generated tokens.
fn segment_means(t: &BudgetTrace, segment: usize, f: impl Fn(usize) -> f64) -> Vec<f64> {
    (0..t.tokens.len())
        .step_by(segment)
        .map(|a| {
            let b = (a + segment).min(t.tokens.len());
            (a..b).map(&f).sum::<f64>() / (b - a) as f64
        })
        .collect()
}

const MIB: f64 = (1 << 20) as f64;

/// Markdown tables of a budget run: per session the mean KLD and top-1 agreement
/// (95% intervals over segments of `segment` tokens) and the KV memory it held; then
/// the KLD and the KV memory segment by segment.
pub fn budget_markdown(traces: &[BudgetTrace], segment: usize) -> String {
    let mut out = String::from(
        "| session | mean KLD (nats/token) | top-1 agreement | KV MiB after the first segment | KV MiB at most after it | KV MiB at the end |\n|---|---|---|---|---|---|\n",
    );
    for t in traces {
        let kld = summarize(&segment_means(t, segment, |i| t.tokens[i].kld));
        let top1 = summarize(&segment_means(t, segment, |i| {
            f64::from(u8::from(t.tokens[i].same_top1))
        }));
        let first = segment.min(t.kv_bytes.len()).saturating_sub(1);
        let after = t.kv_bytes[first..].iter().copied().max().unwrap_or(0);
        let _ = writeln!(
            out,
            "| {} | {:.4} ± {:.4} | {:.3} ± {:.3} | {:.2} | {:.2} | {:.2} |",
            session_name(t),
            kld.mean,
            kld.ci95,
            top1.mean,
            top1.ci95,
            t.kv_bytes.get(first).copied().unwrap_or(0) as f64 / MIB,
            after as f64 / MIB,
            t.kv_bytes.last().copied().unwrap_or(0) as f64 / MIB,
        );
    }
    let n = traces.first().map_or(0, |t| t.tokens.len());
    let header = |what: &str| {
        let mut h = format!("\n{what}\n\n| session |");
        for a in (0..n).step_by(segment) {
            let _ = write!(h, " {}-{} |", a + 1, (a + segment).min(n));
        }
        h.push_str("\n|---|");
        h.push_str(&"---|".repeat(n.div_ceil(segment)));
        h.push('\n');
        h
    };
    out.push_str(&header("Mean KLD per segment of generated tokens:"));
    for t in traces.iter().filter(|t| t.variant.is_some()) {
        let _ = write!(out, "| {} |", session_name(t));
        for m in segment_means(t, segment, |i| t.tokens[i].kld) {
            let _ = write!(out, " {m:.4} |");
        }
        out.push('\n');
    }
    out.push_str(&header("KV MiB held at the end of each segment:"));
    for t in traces {
        let _ = write!(out, "| {} |", session_name(t));
        for b in t.kv_bytes.chunks(segment) {
            let _ = write!(out, " {:.2} |", *b.last().unwrap_or(&0) as f64 / MIB);
        }
        out.push('\n');
    }
    out
}

/// Every generated token of every session: its comparison and the KV bytes held.
pub fn budget_csv(traces: &[BudgetTrace]) -> String {
    let mut out = String::from("session,token,kld,same_top1,delta_nll,kv_bytes\n");
    for t in traces {
        let name = session_name(t);
        for (i, (f, b)) in t.tokens.iter().zip(&t.kv_bytes).enumerate() {
            let _ = writeln!(
                out,
                "{name},{},{:.6},{},{:.6},{b}",
                i + 1,
                f.kld,
                u8::from(f.same_top1),
                f.delta_nll
            );
        }
    }
    out
}

/// The traces as JSON: per session its name and, per generated token, the fields of
/// [`budget_csv`].
pub fn budget_json(traces: &[BudgetTrace]) -> serde_json::Value {
    let sessions = traces.iter().map(|t| {
        let tokens = t.tokens.iter().zip(&t.kv_bytes).map(|(f, b)| {
            serde_json::json!({
                "kld": f.kld,
                "same_top1": f.same_top1,
                "delta_nll": f.delta_nll,
                "kv_bytes": b,
            })
        });
        serde_json::json!({"session": session_name(t), "tokens": tokens.collect::<Vec<_>>()})
    });
    serde_json::Value::Array(sessions.collect())
}

/// `budget_kv.png` (KV MiB held against generated tokens, every session) and
/// `budget_kld.png` (mean KLD per segment, the budgeted sessions) in `dir`.
pub fn budget_plots(
    traces: &[BudgetTrace],
    segment: usize,
    dir: &Path,
    title: &str,
) -> Result<Vec<String>, PlotError> {
    register_font();
    let n = traces.first().map_or(0, |t| t.tokens.len()) as f64;
    let kv: Vec<(String, Vec<(f64, f64)>)> = traces
        .iter()
        .map(|t| {
            let pts = t
                .kv_bytes
                .iter()
                .enumerate()
                .map(|(i, &b)| ((i + 1) as f64, b as f64 / MIB))
                .collect();
            (session_name(t), pts)
        })
        .collect();
    let kld: Vec<(String, Vec<(f64, f64)>)> = traces
        .iter()
        .filter(|t| t.variant.is_some())
        .map(|t| {
            let pts = segment_means(t, segment, |i| t.tokens[i].kld)
                .into_iter()
                .enumerate()
                .map(|(s, m)| (((s * segment) as f64 + segment as f64 / 2.0).min(n), m))
                .collect();
            (session_name(t), pts)
        })
        .collect();
    let mut written = Vec::new();
    for (file, caption, y_desc, lines) in [
        (
            "budget_kv.png",
            "KV cache held while generating",
            "KV MiB",
            &kv,
        ),
        (
            "budget_kld.png",
            "KLD vs the full cache, per segment of generated tokens",
            "mean KLD (nats/token)",
            &kld,
        ),
    ] {
        let path = dir.join(file);
        draw_lines(&path, &format!("{title}: {caption}"), y_desc, n, lines)
            .map_err(|e| plot_error(&path, e))?;
        written.push(file.to_string());
    }
    Ok(written)
}

/// Lines of (generated tokens, value), one per session.
fn draw_lines(
    path: &Path,
    caption: &str,
    y_desc: &str,
    x_max: f64,
    lines: &[(String, Vec<(f64, f64)>)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let y_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0f64..x_max.max(1.0), 0.0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("generated tokens")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (name, pts)) in lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Plots draw text with a font built into the binary, so they need no system fonts.
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is a valid TrueType file shipped by the crate; failure would only
        // mean unlabeled plots, so it is not fatal.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::harness::Variant;
    use crate::session::CompressReport;

    #[test]
    fn budget_json_holds_what_the_csv_holds() {
        use crate::eval::budget::BudgetVariant;
        use crate::eval::fidelity::TokenFidelity;
        let tok = |kld: f64, same_top1: bool| TokenFidelity {
            kld,
            same_top1,
            delta_nll: -kld,
        };
        let traces = [
            BudgetTrace {
                variant: None,
                tokens: vec![tok(0.0, true), tok(0.0, true)],
                kv_bytes: vec![100, 200],
            },
            BudgetTrace {
                variant: Some(BudgetVariant {
                    policy: Policy::SnapKv,
                    budget: 64,
                }),
                tokens: vec![tok(0.25, false), tok(0.5, true)],
                kv_bytes: vec![90, 120],
            },
        ];
        let json = budget_json(&traces);
        let csv = budget_csv(&traces);
        let rows: Vec<&str> = csv.lines().skip(1).collect();
        let mut i = 0;
        for session in json.as_array().unwrap() {
            for (n, t) in session["tokens"].as_array().unwrap().iter().enumerate() {
                let same = u8::from(t["same_top1"].as_bool().unwrap());
                let row = format!(
                    "{},{},{:.6},{same},{:.6},{}",
                    session["session"].as_str().unwrap(),
                    n + 1,
                    t["kld"].as_f64().unwrap(),
                    t["delta_nll"].as_f64().unwrap(),
                    t["kv_bytes"]
                );
                assert_eq!(row, rows[i]);
                i += 1;
            }
        }
        assert_eq!(i, rows.len());
    }

    fn answers(policy: Policy, keep: f64, scores: &[f64]) -> Vec<Answer> {
        scores
            .iter()
            .map(|&score| Answer {
                variant: Variant::new(policy, keep),
                query: 0,
                score,
                text: String::new(),
                // Varies with the score, so that its interval is not zero.
                evidence_kept: keep * (0.6 + 0.4 * score),
                compression: CompressReport::default(),
            })
            .collect()
    }

    #[test]
    fn rows_tables_and_informative_tasks() {
        let mut r = Results::default();
        r.add_answers(
            TaskKind::SingleNoise,
            512,
            answers(Policy::Full, 1.0, &[1.0, 1.0]),
        );
        r.add_answers(
            TaskKind::SingleNoise,
            512,
            answers(Policy::KvZip, 0.3, &[1.0, 0.0]),
        );
        r.add_answers(
            TaskKind::KvRetrieval,
            512,
            answers(Policy::Full, 1.0, &[0.0, 1.0, 0.0]),
        );
        let rows = r.rows();
        assert_eq!(rows.len(), 3);
        assert!(informative(&rows, "single-noise", 512));
        assert!(!informative(&rows, "kv", 512));
        let kvzip = rows.iter().find(|r| r.policy == "kvzip").unwrap();
        assert_eq!((kvzip.n, kvzip.accuracy.unwrap().mean), (2, 0.5));
        let md = markdown(&rows);
        // Wilson intervals: 1 of 3 is [0.06, 0.79]; 2 of 2 [0.34, 1]; 1 of 2 [0.09, 0.91].
        assert!(
            md.contains("| kv | 512 | 3 | 0.33 [0.06, 0.79] | no |"),
            "{md}"
        );
        // keep 1.0 is the full cache's figure; kv is uninformative, so not pooled.
        assert!(
            md.contains("| kvzip | 1.00 [0.34, 1.00] | 0.50 [0.09, 0.91] |"),
            "{md}"
        );
        assert_eq!(csv(&rows).lines().count(), 4);

        // The CSV reads back into the same tables, and a merge replaces re-measured rows.
        let back = rows_from_csv(&csv(&rows)).unwrap();
        assert_eq!(markdown(&back), md);
        let mut again = Results::default();
        again.add_answers(
            TaskKind::SingleNoise,
            512,
            answers(Policy::KvZip, 0.3, &[1.0, 1.0]),
        );
        again.add_answers(
            TaskKind::SingleNoise,
            512,
            answers(Policy::Gated, 0.3, &[0.0, 1.0]),
        );
        let merged = merge(back, again.rows());
        assert_eq!(merged.len(), 4);
        let kvzip: Vec<&Row> = merged.iter().filter(|r| r.policy == "kvzip").collect();
        assert_eq!(kvzip.len(), 1);
        assert_eq!(kvzip[0].accuracy.unwrap().mean, 1.0);
        assert!(rows_from_csv("task,n\nsingle-noise,x\n").is_err());
    }

    #[test]
    fn the_full_cache_alone_gives_no_empty_tables() {
        let mut r = Results::default();
        r.add_answers(
            TaskKind::SingleNoise,
            512,
            answers(Policy::Full, 1.0, &[1.0]),
        );
        let md = markdown(&r.rows());
        assert!(md.contains("### Full cache accuracy"));
        assert!(!md.contains("| policy |"), "{md}");
    }

    /// With several context lengths, a plot per length and metric against the keep
    /// ratio, and the metrics against the length, are written.
    #[test]
    fn plots_by_length() {
        let mut r = Results::default();
        for (len, hit) in [(1024, 1.0), (4096, 0.5)] {
            r.add_answers(
                TaskKind::SingleNoise,
                len,
                answers(Policy::Full, 1.0, &[1.0, 1.0, 1.0]),
            );
            for keep in [0.5, 0.3] {
                r.add_answers(
                    TaskKind::SingleNoise,
                    len,
                    answers(Policy::Gated, keep, &[1.0, hit, 0.0]),
                );
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let written = plots(&r.rows(), dir.path(), "test").unwrap();
        assert_eq!(
            written,
            [
                "accuracy_1024.png",
                "accuracy_4096.png",
                "accuracy_by_length.png"
            ]
        );
        for f in &written {
            let bytes = std::fs::read(dir.path().join(f)).unwrap();
            assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "{f}");
        }
    }

    #[test]
    fn pooled_interval_weights_groups_by_size() {
        let a = summarize(&[1.0, 0.0]);
        let b = summarize(&[1.0, 1.0, 1.0, 1.0]);
        let (mean, ci) = pool([(2, a), (4, b)].into_iter()).unwrap();
        assert!((mean - 5.0 / 6.0).abs() < 1e-12);
        // Only the first group varies: its variance of the mean, scaled to the pool.
        let want = 1.96 * ((a.ci95 / 1.96).powi(2) * 4.0).sqrt() / 6.0;
        assert!((ci - want).abs() < 1e-12);
    }
}
