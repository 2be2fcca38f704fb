"""Command line: ``vllm-patches`` and ``apply-patches``. Parsing and error rendering only."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from vllm_patches.errors import PatchToolError, ReportedError
from vllm_patches.sources.releases import release_arg

STATUS_EXIT = {"patched": 0, "upstream": 0, "unpatched": 3, "modified": 4}
"""``status`` exit codes, so that a pipeline can gate on them (1 is an error, as everywhere)."""


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm-lmcache-mp")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _release(text: str) -> str:
    """:func:`release_arg` as an argparse type: a bad release number is a usage mistake."""
    try:
        return release_arg(text)
    except PatchToolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A top-level parser: ``--version`` is the tool's, ``-v`` works before or after a command."""
    parser = _Parser(prog=prog, description=description)
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {_tool_version()}",
        help="print this tool's version and exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is run")
    return parser


def _common() -> argparse.ArgumentParser:
    """Options every subcommand takes too (so ``-v`` may follow the command)."""
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what is run"
    )
    return common


def _target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", nargs="?", type=Path, help="a vLLM git checkout or an unpacked vLLM source tree"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--site", action="store_true", help="the vLLM installed in this Python")
    where.add_argument(
        "--python", metavar="PATH", help="the vLLM installed in that Python (its venv's python)"
    )
    parser.add_argument(
        "--vllm-version",
        type=_release,
        metavar="VERSION",
        help="the vLLM release, if it cannot be detected",
    )


def _apply_args(parser: argparse.ArgumentParser, *, revert_flag: bool) -> None:
    _target_args(parser)
    parser.add_argument(
        "--check",
        action="store_true",
        help="run every check the real command runs and say what it would do; change nothing "
        "(exit 1 where it would refuse)",
    )
    if revert_flag:
        parser.add_argument("--revert", action="store_true", help="take the series off again")
    parser.add_argument(
        "--force",
        action="store_true",
        help="go on despite a locally modified vLLM file where nothing is lost: git am -3 on a "
        "checkout (never over uncommitted changes), or revert of an installed vLLM",
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    parser.set_defaults(func=_cmd_apply)


def _target(args: argparse.Namespace):  # noqa: ANN202 - lazy import keeps the CLI cheap
    from vllm_patches.targets.find import resolve_target

    if args.target is not None and (args.site or args.python):
        msg = "give either a tree or --site/--python, not both"
        raise PatchToolError(msg)
    return resolve_target(
        args.target, site=args.site, python=args.python, version=args.vllm_version
    )


def _cmd_pairs(args: argparse.Namespace) -> int:
    import json

    from vllm_patches.diagnosis import matrix

    answer = matrix.pairs(matrix.shipped(), args.version)
    print(json.dumps(answer, indent=2) if args.json else "\n".join(matrix.pairs_lines(answer)))
    return 0 if answer["recommended"] else 2


def _cmd_checkout(args: argparse.Namespace) -> int:
    from vllm_patches.sources.releases import checkout

    print(checkout(args.version, args.dest))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from vllm_patches.targets.apply import status

    st = status(_target(args))
    if args.json:
        print(json.dumps(st.as_dict(), indent=2))
    else:
        print("\n".join(st.lines()))
    return STATUS_EXIT[st.overall]


def _cmd_overlay(args: argparse.Namespace) -> int:
    from vllm_patches.series.manifest import require_clone
    from vllm_patches.series.overlay import regenerate

    if not args.check:
        require_clone("vllm-patches overlay")

    report = regenerate(check=args.check)
    for line in report:
        print(line)
    if args.check and report:
        msg = (
            "vllm_overlay/ or patches/series.toml is stale; regenerate them with vllm-patches "
            "overlay in a clone of vllm-lmcache-mp (or reinstall this copy)"
        )
        raise PatchToolError(msg)
    if not report:
        print("vllm_overlay/ and patches/series.toml match the series")
    return 0


def _cmd_prove(args: argparse.Namespace) -> int:
    from vllm_patches.diagnosis.prove import prove

    for line in prove(args.version, lmcache=args.lmcache):
        print(line)
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from vllm_patches.diagnosis.vllm_tests import run_vllm_tests

    report = run_vllm_tests(args.version, args.lmcache, args.out, paths=args.tests)
    print("\n".join(report.summary()))
    print(f"no regressions; report in {(args.out or Path.cwd() / f'vllm-tests-{args.version}')}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json
    import sys as _sys

    from vllm_patches.diagnosis.doctor import Diagnosis, diagnose, live_check

    python = args.python or _sys.executable
    live = args.live or args.server is not None
    diagnosis = live_check(python, args.server) if live else diagnose(python)
    if args.json:
        print(json.dumps({**diagnosis.data, "ok": diagnosis.ok}, indent=2))
    else:
        print("\n".join(diagnosis.lines()))
    if diagnosis.ok:
        return 0
    return 3 if isinstance(diagnosis, Diagnosis) and not diagnosis.checked else 2


def _cmd_matrix(args: argparse.Namespace) -> int:
    from vllm_patches.diagnosis import matrix

    if args.merge:
        onto = matrix.load_results([args.onto])[0] if args.onto else None
        result = matrix.merge(matrix.load_results(args.merge), onto)
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
    if args.readme:
        matrix.update_readme(result, args.readme)
    print(matrix.markdown(result), end="")
    print(f"written to {args.out}/matrix.json and matrix.md")
    return 0


def _cmd_releases(args: argparse.Namespace) -> int:
    import json

    from vllm_patches.watch.news import news

    found = news()
    print(json.dumps(found.as_dict(), indent=2) if args.json else "\n".join(found.lines()))
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    import json

    from vllm_patches.series.manifest import require_clone, require_contrib
    from vllm_patches.watch.carry import carry
    from vllm_patches.watch.news import news

    require_clone("vllm-patches watch")
    require_contrib("vllm-patches watch")
    if args.vllm:
        versions = args.vllm
    else:
        found = news()
        versions = found.vllm_missing + found.vllm
    if not versions:
        print("no vLLM release on the index lacks a series")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    stopped = []
    for version in versions:
        result = carry(version)
        body = args.out / f"vllm-{version}.md"
        body.write_text(result.body + "\n")
        (args.out / f"vllm-{version}.json").write_text(
            json.dumps({"title": result.title, "carried": result.carried, "body": str(body)}) + "\n"
        )
        print(f"vLLM {version}: {'carried' if result.carried else 'not carried'}: {body}")
        if not result.carried:
            stopped.append(version)
    return 3 if stopped else 0


def _cmd_wheel(args: argparse.Namespace) -> int:
    from vllm_patches.targets import wheel as wheels

    if args.from_source:
        path = wheels.build_from_source(args.version, args.target_device, args.out)
    else:
        source = args.from_wheel
        if source is None:
            from vllm_patches.sources.releases import download_wheel

            source = download_wheel(args.version)
        path = wheels.repack(source, args.out, force=args.force, version=args.version)
    print(path)
    return 0


def _cmd_verify_wheel(args: argparse.Namespace) -> int:
    from vllm_patches.targets.wheel import verify

    problems = verify(args.path)
    if args.json:
        import json

        print(json.dumps({"wheel": str(args.path), "ok": not problems, "problems": problems}))
        return 1 if problems else 0
    if problems:
        msg = f"{args.path.name}: " + "; ".join(problems[:5])
        raise PatchToolError(msg)
    print(f"{args.path.name}: RECORD, version and overlay files check out")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from vllm_patches.targets.apply import apply

    outcome = apply(_target(args), check=args.check, revert=args.revert, force=args.force)
    if args.json:
        import json

        print(json.dumps({"changed": outcome.changed, "message": outcome.message}))
    else:
        print(outcome.message)
    return 0


def _cmd_rebase(args: argparse.Namespace) -> int:
    from vllm_patches.series.manifest import require_clone, require_contrib

    require_clone("vllm-patches rebase")
    require_contrib("vllm-patches rebase")
    from vllm_patches.series import rebase

    if args.abort:
        print(rebase.abort(args.workdir))
        return 0
    if args.resume:
        result = rebase.resume(args.workdir)
    else:
        result = rebase.start(
            args.onto, args.source, user_checkout=args.checkout, workdir=args.workdir
        )
    print("\n".join(result.lines()))
    return 0


REBASE_HELP = "Carry the series onto another vLLM release with git am -3 (needs a clone)."
UPSTREAM_HELP = (
    "Prepare 0002-0005 (the adapter-aware builtin class, the hardened resolution, their tests) "
    "as a pull request against vLLM's newest supported release (needs a clone, with its "
    "contrib extras)."
)


def rebase_parser() -> argparse.ArgumentParser:
    """The ``rebase-patches`` parser (also ``vllm-patches rebase``)."""
    parser = _parser("rebase-patches", REBASE_HELP)
    _rebase_args(parser)
    return parser


def _rebase_args(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--onto",
        metavar="VERSION",
        type=_release,
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
        type=_release,
        help="the release whose series to carry (default: the newest older one with a series)",
    )
    parser.add_argument(
        "--checkout", type=Path, metavar="DIR", help="your git checkout with tag vVERSION"
    )
    parser.add_argument(
        "--workdir", type=Path, metavar="DIR", help="where the replay runs (default: in the cache)"
    )
    parser.set_defaults(func=_cmd_rebase)


def _cmd_upstream(args: argparse.Namespace) -> int:
    from vllm_patches.series.manifest import require_contrib

    require_contrib("vllm-patches upstream-pr")
    from vllm_patches.upstream import pr as upstream

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
    print("\n".join(pr.lines()))
    return 0


def upstream_parser() -> argparse.ArgumentParser:
    """The ``prepare-upstream-pr`` parser (also ``vllm-patches upstream-pr``)."""
    parser = _parser("prepare-upstream-pr", UPSTREAM_HELP)
    _upstream_args(parser)
    return parser


def _upstream_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", metavar="VERSION", type=_release, help="default: the newest supported release"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="for the patches, PR.md and checks (default: ./upstream-pr-vVERSION)",
    )
    parser.add_argument(
        "--checkout", type=Path, metavar="DIR", help="your vLLM git checkout (default: a fresh one)"
    )
    parser.add_argument(
        "--branch", default="lmcache-mp-connector-hardening", help="the branch to commit on"
    )
    parser.add_argument(
        "--lmcache", type=_release, help="lmcache release for the tests (default: of its time)"
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


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "doctor", "which connector will run here, and will it start?")
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


def _command(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, parents=[_common()])


def _add_release_commands(sub: argparse._SubParsersAction) -> None:
    """Commands about a vLLM release rather than a target: matrix, wheel, test."""
    p = _command(sub, "matrix", "vLLM x lmcache pairing table, unpatched and patched")
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
        help=(
            "remove each vLLM venv the run built once measured (~1 GB each beside the other "
            "cached venvs, whose identical files they share)"
        ),
    )
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge shards' matrix.json files")
    p.add_argument(
        "--onto",
        type=Path,
        metavar="JSON",
        help="with --merge: lay the merged cells over this earlier matrix.json (they replace its)",
    )
    p.add_argument("--out", type=Path, default=Path("matrix"), help="output directory")
    p.add_argument(
        "--readme", type=Path, metavar="PATH", help="also rewrite the README's per-release summary"
    )
    p.set_defaults(func=_cmd_matrix)

    p = _command(
        sub, "releases", "vLLM and lmcache releases on the index that the series or table lack"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_releases)

    p = _command(
        sub,
        "watch",
        "carry the series onto new vLLM releases and write each pull request's title and body "
        "(exit 3 where one needs a person: a conflict, or a wheel-only release with new files)",
    )
    p.add_argument(
        "--vllm", nargs="+", type=_release, help="these releases (default: every new one)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("watch"), help="where the bodies go (vllm-X.md, .json)"
    )
    p.set_defaults(func=_cmd_watch)

    p = _command(sub, "wheel", "a patched vLLM wheel: repack the official one, or build")
    p.add_argument("version", type=_release, help="the vLLM release")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--from-wheel", type=Path, metavar="PATH", help="the official wheel")
    source.add_argument("--download", action="store_true", help="fetch it through pip (default)")
    source.add_argument("--from-source", action="store_true", help="build the patched checkout")
    p.add_argument(
        "--target-device",
        default="empty",
        choices=["empty", "cpu", "cuda"],
        help="with --from-source: VLLM_TARGET_DEVICE (empty builds no kernels)",
    )
    p.add_argument("--out", type=Path, default=Path("dist"), help="output directory")
    p.add_argument("--force", action="store_true", help="replace files that are not the originals")
    p.set_defaults(func=_cmd_wheel)

    p = _command(sub, "verify-wheel", "check a patched wheel's RECORD, version, overlay")
    p.add_argument("path", type=Path, help="the patched wheel")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_verify_wheel)

    p = _command(sub, "test", "run vLLM's connector unit tests, unpatched vs patched")
    p.add_argument("version", type=_release, help="the vLLM release")
    p.add_argument(
        "--lmcache",
        type=_release,
        help="lmcache release (default: one of the vLLM release's time)",
    )
    p.add_argument("--out", type=Path, help="report directory (default: ./vllm-tests-VERSION)")
    p.add_argument("--tests", nargs="+", metavar="PATH", help="default: tests/v1/kv_connector/unit")
    p.set_defaults(func=_cmd_test)


def build_parser() -> argparse.ArgumentParser:
    """The ``vllm-patches`` parser."""
    parser = _parser("vllm-patches", "Carry the LMCacheMPConnector series onto vLLM.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "apply", "apply the series to a vLLM checkout, tree or install")
    _apply_args(p, revert_flag=False)
    p.set_defaults(revert=False)

    p = _command(sub, "revert", "take the series off a vLLM checkout, tree or install again")
    _apply_args(p, revert_flag=False)
    p.set_defaults(revert=True)

    p = _command(sub, "pairs", "which lmcache to install for a vLLM release (pairing table)")
    p.add_argument("version", type=_release, help="the vLLM release")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_pairs)

    p = _command(sub, "checkout", "make a git checkout of a vLLM release from its sdist")
    p.add_argument("version", type=_release, help="the vLLM release")
    p.add_argument("--dest", type=Path, help="where (default: the cached checkout)")
    p.set_defaults(func=_cmd_checkout)

    p = _command(
        sub,
        "status",
        "unpatched, patched, upstream or modified (exit 0 patched or upstream, 3 unpatched, "
        "4 modified)",
    )
    _target_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_status)

    p = _command(sub, "overlay", "regenerate vllm_overlay/ and the manifest hashes (needs a clone)")
    p.add_argument("--check", action="store_true", help="only report differences (runs anywhere)")
    p.set_defaults(func=_cmd_overlay)

    p = _command(sub, "prove", "install vLLM, apply the series, show the resolved class")
    p.add_argument("version", type=_release, help="the vLLM release")
    p.add_argument(
        "--lmcache",
        type=_release,
        help="lmcache release (default: one of the vLLM release's time)",
    )
    p.set_defaults(func=_cmd_prove)

    _add_doctor(sub)

    _add_release_commands(sub)
    _rebase_args(_command(sub, "rebase", REBASE_HELP))
    _upstream_args(_command(sub, "upstream-pr", UPSTREAM_HELP))
    return parser


def apply_parser() -> argparse.ArgumentParser:
    """The ``apply-patches`` parser."""
    parser = _parser("apply-patches", "Apply the LMCacheMPConnector series to a vLLM target.")
    _apply_args(parser, revert_flag=True)
    return parser


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, a usage mistake: said already
        return int(exc.code or 0)
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
    except BrokenPipeError:  # `... | head`: the reader has gone, nothing more to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115, PTH123 - keeps the exit quiet
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
