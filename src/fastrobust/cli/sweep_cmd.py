"""``fastrobust sweep SPEC.yaml --out DIR``: run the cross product of a grid of settings (see docs/experiments.md)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep", help="run a grid of training runs from a YAML spec (restartable)",
        description="Run every combination of a spec's grid, one after another, each in DIR/<name>. "
        "Finished runs are skipped, interrupted ones resumed: run the same command again after a crash.",
    )
    parser.add_argument("spec", help="sweep spec YAML (see sweeps/ and docs/experiments.md)")
    parser.add_argument("--out", required=True, help="sweep folder: one sub-folder per run, plus sweep.json")
    parser.add_argument("--dry-run", action="store_true", help="validate the spec and list the runs and what each needs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    parser.add_argument("--json", action="store_true", help="print the final sweep.json content")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastrobust.analysis.sweep import run_sweep  # startup

    log = _runs_only if args.quiet else (lambda message: print(message, file=sys.stderr))
    summary = run_sweep(args.spec, args.out, dry_run=args.dry_run, progress=not args.quiet, log=log)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
        return 0
    if args.dry_run:
        from fastrobust.train.plan import duration, estimate_runs  # startup

        width = max([len(r["name"]) for r in summary["runs"]] + [3])
        estimates = estimate_runs([r["config"] for r in summary["runs"] if r["status"] != "done"])
        print(f"{len(summary['runs'])} runs planned in {args.out} (nothing was run):")
        for record in summary["runs"]:
            config = record["config"]
            seconds = estimates.get(id(config))
            cost = "" if record["status"] == "done" else f", about {duration(seconds)}" if seconds else ", time ?"
            print(f"  {record['name']:<{width}}  {record['status']:<8}  {config['method']} / {config['model']} / "
                  f"{config['dataset']}, {config['epochs']} epochs, seed {config['seed']}{cost}")
        known = [s for s in estimates.values() if s]
        print(f"estimated training time of the runs to do on this machine: about {duration(sum(known))} (a few timed "
              "steps per distinct setting; extra evaluations not included)" if known else
              "no training time could be estimated (unknown dataset shapes)")
        return 0
    failed = [r for r in summary["runs"] if r["status"] == "failed"]
    done = [r for r in summary["runs"] if r["status"] == "done"]
    print(f"sweep {args.out}: {len(done)}/{len(summary['runs'])} runs done"
          + (f", {len(failed)} failed: {', '.join(r['name'] for r in failed)} (see {args.out}/sweep.json)" if failed else ""))
    return 1 if failed else 0


def _runs_only(message: str) -> None:
    """With --quiet keep the one-line-per-run messages, drop everything else."""
    if message.startswith("["):
        print(message, file=sys.stderr)
