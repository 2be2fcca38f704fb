"""The command line's conventions: one tool with subcommands, aliases, versions, exit codes."""

from __future__ import annotations

import json

import pytest
from vllm_patches.__main__ import apply_main, main, rebase_main, upstream_main


@pytest.mark.parametrize(
    ("entry", "prog"),
    [
        (main, "vllm-patches"),
        (apply_main, "apply-patches"),
        (rebase_main, "rebase-patches"),
        (upstream_main, "prepare-upstream-pr"),
    ],
)
def test_version_is_the_tools_own(entry, prog, capsys):
    assert entry(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"{prog} 0.")


def test_every_command_and_argument_has_help(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("apply", "revert", "status", "doctor", "pairs", "wheel", "verify-wheel",
                    "checkout", "test", "matrix", "rebase", "upstream-pr"):  # fmt: skip
        assert f"    {command} " in text or f"    {command}\n" in text, command
        assert main([command, "--help"]) == 0
        usage = capsys.readouterr().out
        assert "-v, --verbose" in usage, command


def test_verbose_works_before_and_after_the_command(cli):
    for args in (("-v", "pairs", "0.21.0"), ("pairs", "0.21.0", "-v")):
        code, out, _ = cli(*args)
        assert code == 0 and out.startswith("vLLM 0.21.0: install lmcache==")


def test_status_json_and_exit_codes_gate_a_pipeline(plain_tree, cli):
    tree = plain_tree("0.21.0")
    code, out, _ = cli("status", tree, "--json")
    assert code == 3 and json.loads(out)["overall"] == "unpatched"
    assert cli("apply", tree)[0] == 0
    code, out, _ = cli("status", tree, "--json")
    data = json.loads(out)
    assert code == 0 and data["overall"] == "patched" and data["patches"]["0004"] == "applied"
    connector = tree / "vllm/distributed/kv_transfer/kv_connector/v1/lmcache_mp_connector.py"
    connector.write_text("# edited\n")
    assert cli("status", tree)[0] == 4
    connector.unlink()


def test_apply_and_revert_are_subcommands_and_apply_patches_stays(plain_tree, cli, apply_cli):
    tree = plain_tree("0.19.1")
    code, out, _ = cli("apply", tree, "--check", "--json")
    assert code == 0 and json.loads(out) == {
        "changed": False,
        "message": f"the series applies cleanly to source tree {tree} (vLLM 0.19.1)",
    }
    assert cli("apply", tree)[0] == 0
    assert apply_cli(tree)[1].endswith("is already patched: nothing to do\n")
    code, out, _ = cli("revert", tree)
    assert code == 0 and out.startswith("reverted the series of vLLM 0.19.1")


def test_pairs_answers_from_the_shipped_table(cli):
    code, out, _ = cli("pairs", "v0.21.0", "--json")
    answer = json.loads(out)
    assert code == 0 and answer["vllm"] == "0.21.0"
    best = answer["recommended"]
    assert best["patched"] == "works" and best["pin_conflicts"] == []
    # The newest lmcache (0.5.6 has no copies made for older vLLM): the series' builtin.
    assert best["lmcache"] == "0.5.6" and best["connector"] == "builtin"
    code, out, err = cli("pairs", "0.99.0")
    assert code == 1 and err == (
        "error: vLLM 0.99.0 is newer than the pairing table (newest: 0.34.0); the release "
        "watcher measures a new release's row in the pull request that carries the series onto "
        "it (vllm-patches releases lists what is new)\n"
    )


def test_a_usage_mistake_is_one_line(cli):
    code, out, err = cli("checkout", "latest")
    assert (code, out) == (2, "")
    assert err == (
        "error: argument version: 'latest' is not a release number; give one like 0.21.0 "
        "(see vllm-patches checkout --help)\n"
    )
