"""``fastrobust report DIR``: tables and figures (Markdown + PNG, self-contained HTML) from run records."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="tables and figures from the runs under a folder (e.g. a sweep)",
        description="Reads every result.json (with metrics.jsonl, a sweep's eval.json and the evaluations/ records "
        "of fastrobust eval) under DIR and writes report.md, PNG figures and report.html (figures embedded) to --out "
        "(default DIR/report).",
    )
    parser.add_argument("dir", help="a run folder, a sweep folder or any folder holding run folders")
    parser.add_argument("--out", default=None, help="report folder (default: DIR/report)")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument("--note", action="append", default=[], help="a line added to 'What was run' (repeatable)")
    parser.add_argument("--no-html", action="store_true", help="write only the Markdown and PNG files")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastrobust.analysis.report import build_report  # startup
    from fastrobust.analysis.report.text import plural  # startup

    written = build_report(args.dir, args.out, title=args.title, notes=args.note, html_page=not args.no_html)
    print(f"report of {plural(written['runs'], 'run')}: {written['markdown']}"
          + (f", {written['html']}" if "html" in written else "")
          + (f"; {plural(len(written['figures']), 'figure')}" if written["figures"] else "")
          + (f"; {plural(len(written['missing']), 'run folder')} without a result" if written["missing"] else ""))
    return 0
