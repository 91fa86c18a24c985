"""The report page: sections of text, tables and figures, written as ``report.md`` (figures as PNG files beside
it) and ``report.html`` (the same content, figures embedded: one self-contained file)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastrobust.analysis.report import figures, tables
from fastrobust.analysis.report.describe import JPEG_NOTE, averaging_rows, data_roots, describe_runs, portable_path
from fastrobust.analysis.report.groups import Groups, group_runs
from fastrobust.analysis.report.hessian import hessian_curves, hessian_final, hessian_final_table, hessian_table
from fastrobust.analysis.report.intervals import INTERVAL_CAPTION
from fastrobust.analysis.report.runs import Run, collect_runs
from fastrobust.analysis.report.text import plural, short_key
from fastrobust.core.output_files import folder_problem
from fastrobust.errors import FastRobustError

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
         "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
         "td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
         ".wide{overflow-x:auto;max-width:100%}"
         "img{max-width:100%;height:auto;display:block;margin:0.5em 0}figcaption{font-size:13px;color:#444}")


@dataclass
class Section:
    """A heading with its blocks: ("text", str), ("list", (markdown, html)), ("table", (header, rows)) or
    ("figure", (caption, path))."""

    heading: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def text(self, value: str) -> Section:
        self.blocks.append(("text", value))
        return self

    def table(self, header: list[str], rows: list[list[str]]) -> Section:
        self.blocks.append(("table", (header, rows)))
        return self

    def figure(self, caption: str, path: Path | None) -> Section:
        if path is not None:
            self.blocks.append(("figure", (caption, path)))
        return self

    def figures(self) -> list[Path]:
        return [value[1] for kind, value in self.blocks if kind == "figure"]


# ----------------------------------------------------------------------------------------- writing
def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _inline(text: str) -> str:
    """A paragraph's Markdown in HTML: escaped, ``**bold**`` and backquoted code kept."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.heading}", ""]
        for kind, value in section.blocks:
            if kind == "text":
                lines += [value, ""]
            elif kind == "list":
                lines += [value[0], ""]
            elif kind == "table":
                lines += [markdown_table(*value), ""]
            else:
                caption, path = value
                lines += [f"![{caption}]({path.name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _html(title: str, sections: list[Section]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<meta name='viewport' content='width=device-width'><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        for kind, value in section.blocks:
            if kind == "text":
                parts.append(f"<p>{_inline(value)}</p>")
            elif kind == "list":
                parts.append(value[1])
            elif kind == "table":
                parts.append(html_table(*value))
            else:
                caption, path = value
                data = base64.b64encode(path.read_bytes()).decode()
                parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------- sections
def _what_was_run(runs: list[Run], notes: list[str]) -> Section:
    described, jpeg = describe_runs(runs)
    lines = described + notes
    section = Section("What was run")
    markdown = "\n".join(f"- {line}" for line in lines)
    markup = "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"
    section.blocks.append(("list", (markdown, markup)))
    if jpeg:
        section.text(f"**Note.** {JPEG_NOTE}")
    return section


def _accuracy_section(groups: Groups, runs: list[Run], out: Path) -> Section:
    header, rows = tables.table2(groups)
    caption = (f"{INTERVAL_CAPTION} Accuracies in % on the test points; time = training time (train_seconds: "
               "training steps only, without validation); Time / TRADES relative to TRADES runs of the same dataset, "
               "model and epochs; Declared passes = the method's cost per step in forward+backward passes (a forward "
               "alone counts 1/3), the load-independent reference. \"-\": no record.")
    caption += tables.points_caption(runs)
    if any("†" in row[4] for row in rows):
        caption += (" †: AutoAttack-fast (APGD-CE + APGD-T only, see the settings above), an upper bound of the "
                    "standard AutoAttack accuracy.")
    section = Section("Accuracy and cost (the paper's Table 2 layout)").table(header, rows).text(caption)
    kinds = [k for k in figures.ROBUST_ORDER if k in {figures.robust_metric(g) for _, g in groups}]
    drawn = (f"{tables.METRIC_NAMES[kinds[0]]} accuracy" if len(kinds) == 1 else
             f"Robust accuracy ({', else '.join(tables.METRIC_NAMES[k] for k in kinds)}: the strongest attack run)")
    section.figure(f"{drawn} against training time and against the declared cost per training step; one point per "
                   f"{'method' if len(groups) == len({r.method for r in runs}) else 'group'} (several seeds: mean, "
                   "error bars ± std over the seeds; one run: its 95 % Wilson interval)" + figures.legend_key(groups),
                   figures.figure_cost(groups, out))
    section.figure("Test accuracy by method (error bars: the intervals of the table)" + figures.legend_key(groups),
                   figures.figure_table(groups, out))
    return section


def _averaging_section(runs: list[Run], out: Path) -> Section | None:
    header, rows = averaging_rows(runs)
    if not rows:
        return None
    section = Section("Weight averaging").table(header, rows)
    section.text("best holds the weights (trained or averaged) that validated best, among those ema_select "
                 "lets compete; the test accuracies above are those of best.")
    return section.figure("Validation robust accuracy of the trained and of the averaged weights per epoch "
                          "(dotted: the epoch of best)", figures.figure_averaging(runs, out))


def _stability_section(groups: Groups, runs: list[Run], out: Path) -> Section | None:
    names = tables.column_names(runs)
    section = Section("Stability over seeds (paper Figs. 1, 2, 5)")
    for metric in ("pgd20", "pgd100", "autoattack"):
        header, rows = tables.stability(groups, metric)
        if rows:
            section.text(f"{names[metric]} accuracy (%) over seeds:").table(header, rows)
    section.figure("Robust accuracy over seeds (box: quartiles, line: median, triangle: mean, dots: seeds)"
                   + figures.legend_key(groups), figures.figure_stability(groups, out))
    return section if section.blocks else None


def _smoothness_section(groups: Groups, runs: list[Run], out: Path) -> Section | None:
    curves, finals = hessian_curves(groups), hessian_final(groups)
    if not (curves or finals):
        return None
    settings = next(r.hessian for r in runs if r.hessian)
    hs = settings.get("settings", {})
    balanced = all((r.hessian.get("points") or {}).get("selection") == "balanced_head" for r in runs if r.hessian)
    where = (f"{settings.get('n', '?')} class-balanced test points" if balanced else
             f"the first {settings.get('n', '?')} points of the class-sorted test split (a few classes only: "
             "hessian.json written before sweeps balanced the points; run the sweep command again to redo it)")
    caption = (f"Top eigenvalue of the Hessian of the {str(hs.get('loss', 'kl')).upper()} inner-maximisation loss "
               f"with respect to the input, at the attack's starting point, mean over {where} "
               f"({hs.get('iterations', '?')} power iterations; hessian.json of each run); mean over seeds. A smaller "
               "value is a smoother loss: the paper's Fig. 3 shows the backward-smoothing start below the random one "
               "throughout training.")
    section = Section("Loss smoothness (paper Fig. 3)")
    if curves:
        section.table(*hessian_table(curves))
    if finals:
        section.text("Final (best) model only (evaluate.hessian.per_epoch: false), mean ± std over seeds:")
        section.table(*hessian_final_table(finals))
    section.text(caption)
    short, key = figures.legend_labels(groups), figures.legend_key(groups)
    if curves:
        return section.figure("Top input-Hessian eigenvalue against the epoch: random vs backward-smoothing start"
                              + key, figures.figure_hessian(curves, out, short))
    return section.figure("Top input-Hessian eigenvalue of the final (best) model: random vs backward-smoothing start"
                          + key, figures.figure_hessian_final(finals, out, short))


def _sensitivity_section(runs: list[Run]) -> Section | None:
    found = tables.sensitivity(runs)
    if not found:
        return None
    section = Section("Sensitivity")
    section.text("Each table compares runs of one method that differ in that one setting and in nothing else "
                 "(seeds pooled); runs that differ in more settings are in no table.")
    for method, key, header, rows in found:
        section.text(f"{method}, {short_key(key)}:").table(header, rows)
    return section


def _curves_section(groups: Groups, out: Path) -> Section | None:
    section = Section("Training curves")
    section.figure("Validation robust accuracy and training loss per epoch (mean over seeds; each method's own "
                   "training loss: CE or the TRADES objective, so compare shapes, not levels)"
                   + figures.legend_key(groups), figures.figure_curves(groups, out))
    section.figure("Robust accuracy against eps, one panel per threat model (l_inf in x/255, l2 and l1 as given); "
                   "a line joins the evaluations of one group on one set of test points (n: their number where a "
                   "group was evaluated on several)" + figures.legend_key(groups),
                   figures.figure_eps(figures.eps_curves(groups), out, figures.legend_labels(groups)))
    return section if section.blocks else None


def _runs_section(runs: list[Run], missing: list[dict[str, Any]]) -> Section:
    section = Section("Every run").table(*tables.every_run(runs))
    evaluations, superseded, more = tables.every_evaluation(runs)
    if more:  # otherwise every evaluation is in the tables above already
        section.text("Every evaluation:").table(*evaluations).text(tables.every_evaluation_caption(superseded))
    if missing:
        section.text("Without a result:")
        section.blocks.append(("list", ("\n".join(f"- {m['name']}: {m['reason']}" for m in missing),
                                        "<ul>" + "".join(f"<li>{html.escape(m['name'])}: {html.escape(m['reason'])}</li>"
                                                         for m in missing) + "</ul>")))
    return section


# ----------------------------------------------------------------------------------------- the report
def build_report(runs_dir: str | Path, out_dir: str | Path | None = None, *, title: str | None = None,
                 notes: list[str] | None = None, html_page: bool = True) -> dict[str, Any]:
    """Write ``report.md`` (+ PNGs) and ``report.html`` for the runs under ``runs_dir``.

    Args:
        runs_dir: a run folder, a sweep folder or any folder holding run folders (each with a result.json).
        out_dir: where the report goes (default ``runs_dir/report``).
        title: the report's title (default ``fastrobust report: <folder name>``).
        notes: lines added to "What was run".
        html_page: also write report.html (default True).

    Returns:
        ``{"markdown": path, "html": path (with html_page), "figures": [paths], "runs": count, "missing": [...]}``.

    Raises:
        FastRobustError: ``out_dir`` cannot be written (checked first), or ``runs_dir`` is not a folder or holds
            no run with a result.json.
    """
    runs_dir = Path(runs_dir)
    out = Path(out_dir) if out_dir is not None else runs_dir / "report"
    problem = folder_problem(out)  # before any run is read
    if problem is not None:
        raise FastRobustError(f"the report folder {out} cannot be written: {problem}; choose another --out")
    runs, missing = collect_runs(runs_dir)
    if not runs:
        raise FastRobustError(f"no run with a result.json under {runs_dir}: nothing to report (is the sweep finished?)")
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    title = title or f"fastrobust report: {runs_dir.name} ({plural(len(runs), 'run')})"
    roots = data_roots(runs)
    notes = [portable_path(note, roots) for note in notes or []]
    missing = [dict(m, reason=portable_path(str(m["reason"]), roots)) for m in missing]
    intro = _what_was_run(runs, notes)
    sections = [intro, _accuracy_section(groups, runs, out), _averaging_section(runs, out),
                _stability_section(groups, runs, out), _smoothness_section(groups, runs, out),
                _sensitivity_section(runs), _curves_section(groups, out), _runs_section(runs, missing)]
    sections = [s for s in sections if s is not None]
    (out / "report.md").write_text(_markdown(title, sections))
    written: dict[str, Any] = {"markdown": str(out / "report.md"),
                               "figures": [str(p) for s in sections for p in s.figures()],
                               "runs": len(runs), "missing": missing}
    if html_page:
        (out / "report.html").write_text(_html(title, sections))
        written["html"] = str(out / "report.html")
    return written
