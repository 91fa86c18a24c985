"""Reports: tables and figures from the result records of runs (result.json, metrics.jsonl, the evaluations).

``build_report(runs_dir, out_dir)`` finds every run folder under ``runs_dir`` (a folder holding a
``result.json``; ``runs_dir`` may be one run folder), groups runs that differ only by seed, and writes
``report.md`` with PNG figures beside it and ``report.html`` (the same content, figures embedded as base64,
self-contained):

- the Backward Smoothing paper's Table 2 layout: method, clean, PGD-20, PGD-100, AutoAttack, training time,
  time relative to TRADES, seeds and declared cost; every accuracy with its 95 % interval (a single run: the
  Wilson score interval from its number of test points; several seeds: mean ± std over the seeds);
- the first figure: robust accuracy (AutoAttack where run, else the strongest attack) against training time and
  against the declared passes per step, one point per group, with those intervals as error bars;
- weight averaging: which weights ``best`` holds (trained or averaged, which epoch), and both validation curves;
- stability over seeds (paper Figs. 1, 2, 5), loss smoothness (paper Fig. 3, from hessian.json), training curves,
  robust accuracy against eps;
- sensitivity tables over runs of a method that differ in exactly one setting (gamma, step size, beta, eps,
  ema_decay);
- every run and every evaluation the folders hold: a sweep's ``eval.json`` and the ``evaluations/`` records of
  ``fastrobust eval`` (``fastrobust.train.evaluations``); for each attack the tables take the latest evaluation
  of the best weights at the run's eps on the largest point set, and label columns with their number of points
  when they differ.

The modules: ``runs`` (collecting the records), ``groups``, ``intervals``, ``tables``, ``hessian``, ``figures``,
``describe`` (what was run, portable paths) and ``page`` (Markdown and HTML).
"""

from fastrobust.analysis.report.describe import portable_path
from fastrobust.analysis.report.groups import group_runs, one_setting_sets, varied_keys
from fastrobust.analysis.report.intervals import wilson_interval
from fastrobust.analysis.report.page import build_report
from fastrobust.analysis.report.runs import Run, collect_runs
from fastrobust.analysis.report.tables import sensitivity

__all__ = ["Run", "build_report", "collect_runs", "group_runs", "one_setting_sets", "portable_path", "sensitivity",
           "varied_keys", "wilson_interval"]
