"""`dpop run CONFIG`, `dpop status CONFIG` and `dpop report CONFIG` (also `python -m pipeline ...`)."""
import argparse
import sys

from pipeline.config import config_warnings, load_config
from pipeline.report import write_report
from pipeline.runner import run_stages, stage_states
from pipeline.tracking import attach_eval
from pipeline.vocab import STAGE_NAMES, ConfigError, PlanError, StageError, StageFailed


def _stage_list(text: str) -> list[str]:
    """`a,b` -> [a, b]; unknown names are the runner's to reject (PlanError), for the CLI and callers alike."""
    return [n.strip() for n in text.split(",") if n.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpop", description="DPO-Positive preference training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the stages in order, skipping those whose output is current")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--stages", type=_stage_list, help=f"comma-separated subset of {','.join(STAGE_NAMES)}, or of an online "
                     f"run's round stages (round1/generate, dpop/round2/train, ...: `dpop status` lists them)")
    run.add_argument("--force", type=_stage_list, default=[], help="rerun these stages even if current")
    status = sub.add_parser("status", help="show each stage: done, stale (and why), missing or failed")
    status.add_argument("config", help="YAML config file")
    report = sub.add_parser("report", help="write report.md (and its PNGs) beside the stages, from storage")
    report.add_argument("config", help="YAML config file")
    for p in (run, status, report):
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key by its dotted path, e.g. train.beta=0.05")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "status":
            states = stage_states(cfg)
            width = max(10, *(len(row["stage"]) for row in states))  # an online round's stages: dpop/round2/train
            print(f"{'stage':<{width}} {'state':<8} {'rows':>8}  {'reads':<22} path")
            for row in states:
                rows = "" if row["rows"] is None else row["rows"]
                why = f"  ({row['why']})" if row["why"] else ""
                reads = ",".join(row["reads"]) or "-"
                print(f"{row['stage']:<{width}} {row['state']:<8} {rows:>8}  {reads:<22} {row['path']}{why}")
            return 1 if any(row["state"] == "failed" for row in states) else 0
        if args.command == "report":
            print(f"[dpop] report: {write_report(cfg)}")
            return 0
        for warning in config_warnings(cfg):
            print(f"[dpop] WARNING: {warning}", file=sys.stderr, flush=True)
        run_stages(cfg, args.stages, args.force)
        try:
            report = write_report(cfg)
            print(f"[dpop] report: {report}", flush=True)
        except Exception as e:  # the stages are done and on storage; a report that fails must not hide that
            print(f"[dpop] WARNING: the run report failed ({type(e).__name__}: {e}); `dpop report` retries it",
                  file=sys.stderr, flush=True)
        else:
            try:
                attach_eval(cfg, report)
            except Exception as e:  # likewise: a tracking server that is down must not fail a finished run
                print(f"[dpop] WARNING: adding the eval results to run.trackers failed ({type(e).__name__}: {e}); "
                      f"the next `dpop run` retries it", file=sys.stderr, flush=True)
    except ConfigError as e:
        print(f"dpop: config error: {e}", file=sys.stderr)
        return 2
    except PlanError as e:
        print(f"dpop: {e}", file=sys.stderr)
        return 2
    except (StageFailed, StageError) as e:
        print(f"dpop: {e}", file=sys.stderr)
        return 1
    return 0


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
