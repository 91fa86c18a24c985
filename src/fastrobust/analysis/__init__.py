"""Experiments on top of training: sweeps of runs, reports from their records, loss-smoothness analysis.

- ``fastrobust.analysis.sweep``: ``load_spec``, ``plan_sweep``, ``run_sweep`` (``fastrobust sweep``)
- ``fastrobust.analysis.report``: ``collect_runs``, ``build_report`` (``fastrobust report``)
- ``fastrobust.analysis.hessian``: ``top_eigenvalue``, ``input_hessian_eigenvalues`` (``fastrobust analyze hessian``)
"""
