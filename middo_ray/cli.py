"""The `middo` command: run the loop, prepare the embedded model, check a config, audit the data."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _setup_logging(verbose: bool) -> None:
    """The loop's console: its own lines and progress; Ray's output only with --verbose (middo_ray.console)."""
    from middo_ray.console import configure

    configure(verbose)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (sections: run, data, model, ...)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set select.quality_m=1.0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="middo", description="Middo closed-loop SFT data optimization on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the loop until a stop rule fires")
    _add_config_args(run)
    run.add_argument("--verbose", "-v", action="store_true",
                     help="debug lines, and Ray's own logs and progress in the console (kept on disk otherwise)")
    check = sub.add_parser("config", help="validate a config and print it in full (with defaults)")
    _add_config_args(check)
    sub.add_parser("prepare-model", help="convert the embedded SmolLM2-135M-Instruct once and cache it")
    rep = sub.add_parser("report", help="(re)build the HTML report of a run directory")
    rep.add_argument("run_dir")
    stat = sub.add_parser("status", help="where a run is: its state, stages per round, flags, metric, stop rules")
    stat.add_argument("run_dir")
    stat.add_argument("--json", action="store_true", help="print JSON instead of text")
    show = sub.add_parser("show", help="one sample's history across rounds: signals, flags, refine, each version")
    show.add_argument("run_dir")
    show.add_argument("sample_id", help="a sample id or a unique prefix of one (a rewrite's id works too)")
    show.add_argument("--full", action="store_true", help="print texts in full (default: 600 characters a field)")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    diff = sub.add_parser("diff", help="what changed between two rounds' datasets, D_a -> D_b")
    diff.add_argument("run_dir")
    diff.add_argument("round_a", type=int, help="round of the first dataset (0: the seed data D_0)")
    diff.add_argument("round_b", type=int, nargs="?", help="round of the second (default: round_a against the "
                                                           "round before it)")
    diff.add_argument("--examples", type=int, default=3, help="example ids per kind (default 3)")
    diff.add_argument("--json", action="store_true", help="print JSON instead of text")
    aud = sub.add_parser("audit", help="inject known defects into a copy of the data, diagnose it, and report "
                                       "how well each axis finds them (precision, recall, AUROC)")
    _add_config_args(aud)
    aud.add_argument("--fraction", type=float, default=0.1, help="share of the rows made defective (default 0.1)")
    aud.add_argument("--seed", type=int, default=0, help="seed of the injection (default 0)")
    aud.add_argument("--out", default=None, help="output directory (default: <run.output_dir>/audit_<run_id>)")
    aud.add_argument("--model", default=None, help="current model M_t to diagnose with (default: model.base)")
    aud.add_argument("--kinds", default=None, help="comma-separated defect kinds (default: all of them)")
    aud.add_argument("--dup-threshold", type=float, default=None,
                     help="similarity at which the duplicate check flags a row (default 0.95)")
    aud.add_argument("--verbose", "-v", action="store_true")
    return parser


def _audit(args: argparse.Namespace) -> int:
    """`middo audit`: checks the audit arguments and the config together, then runs the audit."""
    from middo_ray.audit import DEFAULT_DUP_THRESHOLD, DEFAULT_KINDS, AuditError, check_audit_args, run_audit
    from middo_ray.config import ConfigError, load_config

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip()) if args.kinds else DEFAULT_KINDS
    dup = DEFAULT_DUP_THRESHOLD if args.dup_threshold is None else args.dup_threshold
    problems = []
    try:
        check_audit_args(args.fraction, kinds)
    except AuditError as exc:
        problems.append(str(exc))
    if not 0 < dup <= 1:
        problems.append(f"--dup-threshold must be in (0, 1] (got {dup})")
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        problems.append(str(exc))
    if problems:
        print("middo audit: " + "\n".join(problems), file=sys.stderr)
        return 2
    _setup_logging(args.verbose)
    try:
        run_audit(cfg, fraction=args.fraction, seed=args.seed, out_dir=args.out, model=args.model, kinds=kinds,
                  dup_threshold=dup)
    except (AuditError, FileNotFoundError) as exc:
        print(f"middo audit: {exc}", file=sys.stderr)
        return 2
    return 0


def _shutdown_ray() -> None:
    """Disconnects from Ray (and stops a local Ray of the run's own) before the process exits with its code."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception as exc:  # noqa: BLE001 - exiting anyway
        print(f"middo: Ray did not shut down cleanly: {type(exc).__name__}: {exc}", file=sys.stderr)


def stop_message(exc: BaseException) -> str | None:
    """The message of a stage that stopped on purpose (:class:`~middo_ray.llmcalls.TeacherStopped`) wherever it
    sits in the chain of errors that Ray Data and Ray wrap around it; None for any other failure."""
    from middo_ray.llmcalls import TeacherStopped

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)              # Ray's task error: the exception the worker raised
        if type(e) is TeacherStopped:
            return str(e)
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__]
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from middo_ray.config import ConfigError, load_config

    if args.command == "report":
        from middo_ray.report import build_report

        try:
            print(build_report(args.run_dir))
        except FileNotFoundError as exc:
            print(f"middo report: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command in ("status", "show", "diff"):
        from middo_ray.runinfo import runinfo_main

        return runinfo_main(args)

    if args.command == "prepare-model":
        from middo_ray.models import ensure_smollm2

        print(ensure_smollm2())
        return 0
    if args.command == "audit":
        return _audit(args)
    try:
        # `middo run` also checks the files and folders the config names, all before Ray starts.
        cfg = load_config(args.config, args.set, check_files=args.command == "run")
    except ConfigError as exc:
        print(f"middo: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(json.dumps(cfg.model_dump(), indent=2))
        return 0
    _setup_logging(args.verbose)
    from middo_ray.loop import Interrupted, run_loop
    from middo_ray.rundir import ConfigMismatch, RunLocked

    try:
        summary = run_loop(cfg)
    except Interrupted as stop:
        print(f"middo: stopped by {stop.name}; the finished stages and shards are kept: run the same command "
              "again to continue", file=sys.stderr)
        _shutdown_ray()
        return stop.exit_code
    except (RunLocked, ConfigMismatch) as exc:
        print(f"middo: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        stopped = stop_message(exc)
        if stopped is None:
            raise
        print(f"middo: {stopped}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("run_dir", "rounds", "stop_reason", "sizes", "optimized_dataset",
                                              "lineage", "report", "history")}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
