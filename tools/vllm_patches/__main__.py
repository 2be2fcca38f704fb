"""Command line: ``vllm-patches`` and ``apply-patches``. Parsing and error rendering only."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from vllm_patches.errors import PatchToolError, ReportedError
from vllm_patches.sources import release_arg


def _target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", type=Path, help="a vLLM git checkout or source tree")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--site", action="store_true", help="the vLLM installed in this Python")
    where.add_argument("--python", metavar="PATH", help="the vLLM installed in that Python")
    parser.add_argument(
        "--version", type=release_arg, help="the vLLM release, if it cannot be detected"
    )


def _target(args: argparse.Namespace):  # noqa: ANN202 - lazy import keeps the CLI cheap
    from vllm_patches.targets import resolve_target

    if args.target is not None and (args.site or args.python):
        msg = "give either a tree or --site/--python, not both"
        raise PatchToolError(msg)
    return resolve_target(args.target, site=args.site, python=args.python, version=args.version)


def _cmd_checkout(args: argparse.Namespace) -> int:
    from vllm_patches.sources import checkout

    print(checkout(args.version, args.dest))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from vllm_patches.apply import status

    print("\n".join(status(_target(args)).lines()))
    return 0


def _cmd_overlay(args: argparse.Namespace) -> int:
    from vllm_patches.overlay import regenerate

    report = regenerate(check=args.check)
    for line in report:
        print(line)
    if args.check and report:
        msg = "vllm_overlay/ or patches/series.toml is stale; run tools/vllm-patches overlay"
        raise PatchToolError(msg)
    if not report:
        print("vllm_overlay/ and patches/series.toml match the series")
    return 0


def _cmd_prove(args: argparse.Namespace) -> int:
    from vllm_patches.prove import prove

    for line in prove(args.version, lmcache=args.lmcache):
        print(line)
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from vllm_patches.vllm_tests import run_vllm_tests

    report = run_vllm_tests(args.version, args.lmcache, args.out, paths=args.tests)
    for name, run in (("baseline", report.baseline), ("patched", report.patched)):
        counts = ", ".join(f"{n} {k}" for k, n in run.counts().items())
        print(f"{name}: {counts} in {run.seconds:.1f} s")
    series_files = ("lmcache_mp_connector_resolution", "kv_connector_factory_module_path")
    own = [o for t, o in report.patched.outcomes.items() if any(f in t for f in series_files)]
    failed = [o for o in own if o not in ("passed", "skipped")]
    print(
        f"the series' own tests: {own.count('passed')} passed, "
        f"{own.count('skipped')} skipped, {len(failed)} failed"
    )
    if report.regressions:
        msg = f"{len(report.regressions)} regressions, first {report.regressions[0]}"
        raise PatchToolError(msg)
    if failed or not own:
        msg = "the series' own tests did not all pass; see the report"
        raise PatchToolError(msg)
    print(f"no regressions; report in {(args.out or Path.cwd() / f'vllm-tests-{args.version}')}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json
    import sys as _sys

    from vllm_patches.doctor import diagnose, live_check

    python = args.python or _sys.executable
    live = args.live or args.server is not None
    diagnosis = live_check(python, args.server) if live else diagnose(python)
    if args.json:
        print(json.dumps({**diagnosis.data, "ok": diagnosis.ok}, indent=2))
    else:
        print("\n".join(diagnosis.lines()))
    return 0 if diagnosis.ok else 2


def _cmd_matrix(args: argparse.Namespace) -> int:
    from vllm_patches import matrix

    if args.merge:
        result = matrix.merge(matrix.load_results(args.merge))
    else:
        vllm, lmcache = matrix.axes(args.vllm, args.lmcache)
        result = matrix.run_matrix(
            vllm,
            lmcache,
            args.shard,
            lambda m: print(m, file=sys.stderr),
            discard_venvs=args.discard_venvs,
        )
    matrix.write(result, args.out)
    print(matrix.markdown(result), end="")
    print(f"written to {args.out}/matrix.json and matrix.md")
    return 0


def _cmd_wheel(args: argparse.Namespace) -> int:
    from vllm_patches import wheels

    if args.from_source:
        path = wheels.build_from_source(args.version, args.target_device, args.out)
    else:
        source = args.from_wheel
        if source is None:
            from vllm_patches.sources import download_wheel

            source = download_wheel(args.version)
        path = wheels.repack(source, args.out, force=args.force, version=args.version)
    print(path)
    return 0


def _cmd_verify_wheel(args: argparse.Namespace) -> int:
    from vllm_patches.wheels import verify

    problems = verify(args.path)
    if problems:
        msg = f"{args.path.name}: " + "; ".join(problems[:5])
        raise PatchToolError(msg)
    print(f"{args.path.name}: RECORD, version and overlay files check out")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from vllm_patches.apply import apply

    outcome = apply(_target(args), check=args.check, revert=args.revert, force=args.force)
    print(outcome.message)
    return 0


def _cmd_rebase(args: argparse.Namespace) -> int:
    from vllm_patches import rebase

    if args.abort:
        print(rebase.abort(args.workdir))
        return 0
    if args.resume:
        result = rebase.resume(args.workdir)
    else:
        result = rebase.start(
            args.onto, args.source, user_checkout=args.checkout, workdir=args.workdir
        )
    print(f"carried the vLLM {result.source} series onto vLLM {result.onto}: "
          + " ".join(result.carried))  # fmt: skip
    if result.in_base:
        print(f"already in vLLM {result.onto}, dropped from its series: {' '.join(result.in_base)}")
    print(f"new groups: {', '.join(result.new_groups) or 'none'}; "
          f"reused: {', '.join(result.reused_groups) or 'none'}")  # fmt: skip
    print(f"git range-diff, vLLM {result.source} series -> vLLM {result.onto} series:")
    print(result.range_diff, end="")
    print("patches/, patches/series.toml and vllm_overlay/ updated")
    return 0


def rebase_parser() -> argparse.ArgumentParser:
    """The ``rebase-patches`` parser."""
    parser = argparse.ArgumentParser(
        prog="rebase-patches",
        description="Carry the series onto another vLLM release with git am -3.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is run")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--onto",
        metavar="VERSION",
        type=release_arg,
        help="the vLLM release to carry the series to",
    )
    what.add_argument(
        "--continue", dest="resume", action="store_true", help="go on after resolving a conflict"
    )
    what.add_argument("--abort", action="store_true", help="drop the rebase in progress")
    parser.add_argument(
        "--from",
        dest="source",
        metavar="VERSION",
        type=release_arg,
        help="the release whose series to carry (default: the newest older one with a series)",
    )
    parser.add_argument(
        "--checkout", type=Path, metavar="DIR", help="your git checkout with tag vVERSION"
    )
    parser.add_argument(
        "--workdir", type=Path, metavar="DIR", help="where the replay runs (default: in the cache)"
    )
    parser.set_defaults(func=_cmd_rebase)
    return parser


def _cmd_upstream(args: argparse.Namespace) -> int:
    from vllm_patches import upstream

    base = args.base or upstream.newest_release()
    pr = upstream.prepare(
        base,
        args.out or Path.cwd() / f"upstream-pr-v{base}",
        user_checkout=args.checkout,
        branch=args.branch,
        lmcache=args.lmcache,
        assisted_by=tuple(args.assisted_by),
        tests=args.tests,
    )
    print(f"title: {pr.title}")
    print(f"branch {pr.branch} in {pr.checkout}: {len(upstream.PR_PATCHES)} signed-off commits")
    for hook in pr.hooks:
        print(f"  {hook.id}: {hook.outcome}{f' ({hook.detail})' if hook.detail else ''}")
    for name, run in (("vLLM " + base, pr.tests.baseline), ("with the change", pr.tests.patched)):
        counts = ", ".join(f"{n} {k}" for k, n in run.counts().items())
        print(f"tests, {name}: {counts} in {run.seconds:.1f} s")
    print(f"written: {pr.out}/PR.md, {pr.out}/patches/, {pr.out}/checks.txt, {pr.out}/tests/")
    return 0


def upstream_parser() -> argparse.ArgumentParser:
    """The ``prepare-upstream-pr`` parser."""
    parser = argparse.ArgumentParser(
        prog="prepare-upstream-pr",
        description="Prepare 0002 + 0003 as a pull request against vLLM's newest release.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is run")
    parser.add_argument(
        "--base", metavar="VERSION", type=release_arg, help="default: the newest supported release"
    )
    parser.add_argument("--out", type=Path, help="default: ./upstream-pr-vVERSION")
    parser.add_argument("--checkout", type=Path, metavar="DIR", help="your vLLM git checkout")
    parser.add_argument("--branch", default="lmcache-mp-connector-hardening")
    parser.add_argument(
        "--lmcache", type=release_arg, help="lmcache release for the tests (default: of its time)"
    )
    parser.add_argument(
        "--tests",
        nargs="+",
        metavar="PATH",
        help="vLLM test files to run besides the new one (default: tests/v1/kv_connector/unit)",
    )
    parser.add_argument(
        "--assisted-by",
        nargs="+",
        default=[],
        metavar="NAME",
        help="add a Co-authored-by trailer for each (vLLM asks you to disclose AI assistance; "
        "nothing is added unless you pass this)",
    )
    parser.set_defaults(func=_cmd_upstream)
    return parser


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="which connector will run here, and will it start?")
    p.add_argument("--python", metavar="PATH", help="the environment to check (default: this)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--live",
        action="store_true",
        help="build the connector for real against a local server of the installed lmcache",
    )
    how.add_argument(
        "--server",
        metavar="URL",
        help="build the connector for real against this running LMCache server (tcp://HOST:PORT)",
    )
    p.set_defaults(func=_cmd_doctor)


def build_parser() -> argparse.ArgumentParser:
    """The ``vllm-patches`` parser."""
    parser = argparse.ArgumentParser(
        prog="vllm-patches", description="Carry the LMCacheMPConnector series onto vLLM."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is run")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("checkout", help="make a git checkout of a vLLM release from its sdist")
    p.add_argument("version", type=release_arg)
    p.add_argument("--dest", type=Path, help="where (default: the cached checkout)")
    p.set_defaults(func=_cmd_checkout)

    p = sub.add_parser("status", help="unpatched, patched, upstream or modified")
    _target_args(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("overlay", help="regenerate vllm_overlay/ and the manifest hashes")
    p.add_argument("--check", action="store_true", help="only report differences")
    p.set_defaults(func=_cmd_overlay)

    p = sub.add_parser("prove", help="install vLLM, apply the series, show the resolved class")
    p.add_argument("version", type=release_arg)
    p.add_argument(
        "--lmcache",
        type=release_arg,
        help="lmcache release (default: one of the vLLM release's time)",
    )
    p.set_defaults(func=_cmd_prove)

    _add_doctor(sub)

    p = sub.add_parser("matrix", help="vLLM x lmcache pairing table, unpatched and patched")
    p.add_argument(
        "--vllm",
        nargs="+",
        default=["0.12.0", "0.18.1", "0.21.0"],
        help="vLLM releases, or 'all' (every release with a series)",
    )
    p.add_argument(
        "--lmcache",
        nargs="+",
        default=["0.4.7", "0.5.0", "0.5.3", "0.5.6"],
        help="lmcache releases, or 'all' (every final release on the index from 0.3.9.post2)",
    )
    p.add_argument("--shard", help="only shard i/n of the cells (for a fleet of runners)")
    p.add_argument(
        "--discard-venvs",
        action="store_true",
        help="remove each vLLM venv the run built once measured (~3.5 GB each otherwise)",
    )
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge shards' matrix.json files")
    p.add_argument("--out", type=Path, default=Path("matrix"), help="output directory")
    p.set_defaults(func=_cmd_matrix)

    p = sub.add_parser("wheel", help="a patched vLLM wheel: repack the official one, or build")
    p.add_argument("version", type=release_arg)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--from-wheel", type=Path, metavar="PATH", help="the official wheel")
    source.add_argument("--download", action="store_true", help="fetch it through pip (default)")
    source.add_argument("--from-source", action="store_true", help="build the patched checkout")
    p.add_argument("--target-device", default="empty", choices=["empty", "cpu", "cuda"])
    p.add_argument("--out", type=Path, default=Path("dist"), help="output directory")
    p.add_argument("--force", action="store_true", help="replace files that are not the originals")
    p.set_defaults(func=_cmd_wheel)

    p = sub.add_parser("verify-wheel", help="check a patched wheel's RECORD, version, overlay")
    p.add_argument("path", type=Path)
    p.set_defaults(func=_cmd_verify_wheel)

    p = sub.add_parser("test", help="run vLLM's connector unit tests, unpatched vs patched")
    p.add_argument("version", type=release_arg)
    p.add_argument(
        "--lmcache",
        type=release_arg,
        help="lmcache release (default: one of the vLLM release's time)",
    )
    p.add_argument("--out", type=Path, help="report directory (default: ./vllm-tests-VERSION)")
    p.add_argument("--tests", nargs="+", metavar="PATH", help="default: tests/v1/kv_connector/unit")
    p.set_defaults(func=_cmd_test)
    return parser


def apply_parser() -> argparse.ArgumentParser:
    """The ``apply-patches`` parser."""
    parser = argparse.ArgumentParser(
        prog="apply-patches", description="Apply the LMCacheMPConnector series to a vLLM target."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is run")
    _target_args(parser)
    parser.add_argument(
        "--check", action="store_true", help="say what would happen, change nothing"
    )
    parser.add_argument("--revert", action="store_true", help="take the series off again")
    parser.add_argument("--force", action="store_true", help="go on despite local changes")
    parser.set_defaults(func=_cmd_apply)
    return parser


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    from vllm_patches._proc import stopped_on_signals

    try:
        with stopped_on_signals():  # SIGTERM (kill, timeout, Kubernetes) is handled as Ctrl-C
            return args.func(args)
    except ReportedError as exc:
        print(exc.report)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except PatchToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "error: interrupted; what had been changed was put back (a crash is rolled back by "
            "the next command on the same target)",
            file=sys.stderr,
        )
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``vllm-patches``."""
    return _run(build_parser(), argv)


def apply_main(argv: Sequence[str] | None = None) -> int:
    """``apply-patches``."""
    return _run(apply_parser(), argv)


def rebase_main(argv: Sequence[str] | None = None) -> int:
    """``rebase-patches``."""
    return _run(rebase_parser(), argv)


def upstream_main(argv: Sequence[str] | None = None) -> int:
    """``prepare-upstream-pr``."""
    return _run(upstream_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
