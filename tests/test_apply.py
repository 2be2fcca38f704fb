"""apply-patches and status on real vLLM trees made from real sdists."""

from __future__ import annotations

import shutil
import subprocess
import zipfile

import pytest
from conftest import (
    FROM_SDIST,
    USER_IDENTITY,
    assert_record_true,
    connector_bytes,
    tree_snapshot,
    upstream_patches,
)
from packaging.version import Version
from vllm_patches.series.manifest import CONNECTOR, OVERLAY_DIR, sha256_bytes
from vllm_patches.sources.releases import cache_root, download_wheel


def _overlay(manifest, version: str) -> bytes:
    group = next(g for g in manifest.releases[version].groups if g.path == CONNECTOR)
    return (OVERLAY_DIR / group.name / CONNECTOR).read_bytes()


FACTORY = "vllm/distributed/kv_transfer/kv_connector/factory.py"


def _git(tree, *args: str) -> str:
    """git as a user with an identity (the suite itself runs without any git config)."""
    return subprocess.run(
        ["git", *USER_IDENTITY, *args], cwd=tree, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.parametrize("version", FROM_SDIST)
def test_git_checkout_round_trip(manifest, git_tree, cli, apply_cli, version):
    """checkout -> apply -> patched -> file == overlay -> revert -> original bytes."""
    tree = git_tree(version)
    original = connector_bytes(tree)
    assert cli("status", tree)[1].splitlines()[0] == "unpatched"
    code, out, _ = apply_cli(tree)
    assert code == 0 and f"on branch vllm-lmcache-mp/v{version}" in out
    code, out, _ = cli("status", tree)
    upstream = upstream_patches(version)
    # 0006 answers vLLM 0.34.0's scheduler output, 0011 the 0.12/0.13 scheduler's call, 0012
    # tests the copy table of 0.20.x/0.21.0.
    copies = version in ("0.20.0", "0.20.1", "0.20.2", "0.21.0")
    carried = [1, 2, 3, 4, 5, 7, 8, 9, 10]
    if Version(version) < Version("0.20.0"):  # 0000: vLLM 0.21.0's class, which 0001 is for
        carried.insert(0, 0)
    if version == "0.34.0":
        carried.insert(5, 6)
    if version in ("0.12.0", "0.13.0"):
        carried.append(11)
    if copies:
        carried.append(12)
    numbers = [f"{n:04d}" for n in carried]
    assert out.splitlines() == [
        "patched",
        f"git checkout {tree} (vLLM {version}): "
        + ", ".join(f"{n} {'upstream' if n in upstream else 'applied'}" for n in numbers),
    ]
    assert connector_bytes(tree) == _overlay(manifest, version)
    subjects = _git(tree, "log", "--format=%s", f"v{version}..HEAD").splitlines()
    factory = [
        "[KVConnector] Test kv_connector_module_path priority and the creation log",
        "[KVConnector] Say which connector class runs and how it was found",
    ]
    if "0008" not in upstream:
        factory.append("[KVConnector] Prioritize external connector over internal registry")
    connector = [
        "[KVConnector][LMCache] Ask lmcache's worker adapter for the transfer event",
        *(
            ["[KVConnector][LMCache] Pass over lmcache's connector written for an older scheduler"]
            if version == "0.34.0"
            else []
        ),
        "[KVConnector][LMCache] Test the LMCacheMPConnector resolution",
        "[KVConnector][LMCache] Harden the LMCacheMPConnector resolution",
        "[KVConnector][LMCache] Test the adapter-aware LMCacheMPConnectorUpstream",
        "[KVConnector][LMCache] Speak the installed lmcache's adapter API by name",
    ]
    if "0001" not in upstream:
        connector.append(
            "[KVConnector][LMCache] Resolve LMCacheMPConnector to lmcache's implementation"
        )
    if Version(version) < Version("0.20.0"):
        connector.append("[KVConnector][LMCache] Carry vLLM 0.21.0's LMCacheMPConnector")
    if version in ("0.12.0", "0.13.0"):
        factory.insert(
            0, "[KVConnector][LMCache] Track the blocks vLLM 0.12 and 0.13 allocate per call"
        )
    if copies:
        factory.insert(0, "[KVConnector][LMCache] Test the lookup of lmcache's connector copies")
    assert subjects == [*factory, *connector]
    assert _git(tree, "rev-parse", "main") == _git(tree, "rev-parse", f"v{version}")
    assert apply_cli(tree)[:2] == (
        0,
        f"git checkout {tree} (vLLM {version}) is already patched: nothing to do\n",
    )
    code, out, _ = apply_cli("--revert", tree)
    assert code == 0
    assert connector_bytes(tree) == original
    assert _git(tree, "branch", "--show-current") == "main"
    assert cli("status", tree)[1].splitlines()[0] == "unpatched"


@pytest.mark.network
@pytest.mark.parametrize("version", ["0.15.0", "0.15.1"])
def test_a_release_that_ships_wheels_only(manifest, tmp_path, cli, apply_cli, version):
    """A tree of the official wheel's own Python files takes the 0.14.0 bases' series (their files
    are byte for byte those bases) and comes back byte for byte."""
    with zipfile.ZipFile(download_wheel(version)) as wheel:
        sources = [n for n in wheel.namelist() if n.startswith("vllm/") and n.endswith(".py")]
        wheel.extractall(tmp_path / "tree", sources)
    tree = tmp_path / "tree"
    before = tree_snapshot(tree)
    assert cli("status", "--vllm-version", version, tree)[1].startswith("unpatched\n")
    assert apply_cli("--vllm-version", version, tree)[0] == 0
    assert connector_bytes(tree) == _overlay(manifest, "0.14.0")
    assert cli("status", "--vllm-version", version, tree)[1].splitlines() == [
        "patched",
        f"source tree {tree} (vLLM {version}): 0000 applied, 0001 applied, 0002 applied, "
        "0004 applied, "
        "0007 applied, 0008 applied, 0009 applied",
    ]
    assert apply_cli("--revert", "--vllm-version", version, tree)[0] == 0
    assert tree_snapshot(tree) == before


@pytest.mark.network
@pytest.mark.parametrize(
    "command", [["checkout", "--dest"], ["test", "--out"], ["wheel", "--from-source", "--out"]]
)
def test_what_needs_a_source_tree_refuses_a_wheel_only_release_first(cli, tmp_path, command):
    """Before building anything: one line naming what to do instead."""
    before = sorted(p.name for p in (cache_root() / "venvs").glob("vllm-0.15.0-*"))
    code, out, err = cli(*command, tmp_path / "out", "0.15.0")
    assert (code, out) == (1, "")
    assert err == (
        "error: vLLM 0.15.0 ships wheels only (no sdist on the package index), so there is no "
        "source tree or test suite of it to build from; patch its official wheel "
        "(vllm-patches wheel 0.15.0) or an installed vLLM (vllm-patches apply --site)\n"
    )
    assert sorted(p.name for p in (cache_root() / "venvs").glob("vllm-0.15.0-*")) == before
    assert not (cache_root() / "checkouts" / "v0.15.0").exists()


@pytest.mark.parametrize("version", ["0.12.0", "0.18.1", "0.21.0"])
def test_plain_tree_round_trip(manifest, plain_tree, cli, apply_cli, version):
    tree = plain_tree(version)
    before = tree_snapshot(tree)
    assert apply_cli(tree)[0] == 0
    assert connector_bytes(tree) == _overlay(manifest, version)
    assert (tree / "tests/v1/kv_connector/unit/test_lmcache_mp_connector_resolution.py").is_file()
    assert cli("status", tree)[1].startswith("patched\n")
    assert apply_cli(tree)[1].endswith("is already patched: nothing to do\n")
    assert apply_cli("--revert", tree)[0] == 0
    assert tree_snapshot(tree) == before


def _assert_series_on(manifest, root, groups) -> None:
    """Every file of ``groups`` under ``root`` is what the series makes: the overlay file, or
    for a test file (not in the overlay) the result the manifest records."""
    for group in groups:
        data = (root / group.path).read_bytes()
        if group.installed:
            assert data == group.overlay_file.read_bytes(), group.path
        assert sha256_bytes(data) == group.results[-1], group.path


@pytest.mark.parametrize("version", ["0.16.0", "0.21.0"])
def test_plain_tree_round_trip_without_git(manifest, plain_tree, apply_cli, without_git, version):
    tree = plain_tree(version)
    before = tree_snapshot(tree)
    without_git()
    code, out, err = apply_cli(tree)
    assert (code, err) == (0, ""), err
    assert out == f"applied the series of vLLM {version} in {tree}\n"
    _assert_series_on(manifest, tree, manifest.releases[version].groups)
    assert apply_cli("--check", "--revert", tree)[0] == 0
    code, out, err = apply_cli("--revert", tree)
    assert (code, err) == (0, ""), err
    assert tree_snapshot(tree) == before


@pytest.mark.parametrize("version", ["0.16.0", "0.21.0"])
def test_site_round_trip_without_git(manifest, fake_site, apply_cli, cli, without_git, version):
    python, site = fake_site(version)
    before = tree_snapshot(site)
    without_git()
    assert apply_cli("--python", python)[0] == 0
    release = manifest.releases[version]
    _assert_series_on(manifest, site, [g for g in release.groups if g.installed])
    assert not (site / "tests").exists()
    assert_record_true(site)
    assert cli("status", "--python", python)[1].startswith("patched\n")
    code, _, err = apply_cli("--revert", "--python", python)
    assert (code, err) == (0, ""), err
    assert tree_snapshot(site) == before  # the original files and RECORD, byte for byte


def test_a_newer_release_with_known_files_is_offered_their_series(git_tree, cli, apply_cli):
    """A release newer than the series whose connector and factory are a known release's
    (here 0.33.0's files, labelled 0.99.0) is offered that release's series."""
    _refused_as_0_99_0(
        git_tree("0.33.0"),
        cli,
        apply_cli,
        "error: vLLM 0.99.0 has no series yet, but its "
        "vllm/distributed/kv_transfer/kv_connector/v1/lmcache_mp_connector.py and "
        "vllm/distributed/kv_transfer/kv_connector/factory.py are byte for byte vLLM "
        "0.33.0's: apply that series with --vllm-version 0.33.0\n",
    )


def test_a_newer_release_with_new_files_is_sent_to_the_watcher(plain_tree, cli, apply_cli):
    tree = plain_tree("0.33.0")
    factory = tree / "vllm/distributed/kv_transfer/kv_connector/factory.py"
    factory.write_text(factory.read_text() + "# changed in 0.99.0\n")
    _refused_as_0_99_0(
        tree,
        cli,
        apply_cli,
        "error: vLLM 0.99.0 has no series (supported: 0.12.0 … 0.34.0); the release watcher "
        "carries each new release in a pull request (vllm-patches releases lists what is "
        "new); a contributor can carry it with vllm-patches watch --vllm 0.99.0 in a clone "
        "of vllm-lmcache-mp\n",
    )


def _refused_as_0_99_0(tree, cli, apply_cli, expected: str) -> None:
    """``status`` and ``apply`` of ``tree`` labelled 0.99.0 stop with ``expected``, untouched."""
    before = tree_snapshot(tree)
    code, out, err = cli("status", tree, "--vllm-version", "0.99.0")
    assert (code, out, err) == (1, "", expected)
    assert apply_cli(tree, "--vllm-version", "0.99.0")[:2] == (1, "")
    assert tree_snapshot(tree) == before


def test_check_changes_nothing(git_tree, apply_cli):
    tree = git_tree("0.21.0")
    before = tree_snapshot(tree)
    code, out, _ = apply_cli("--check", tree)
    assert code == 0 and "applies cleanly" in out
    assert tree_snapshot(tree) == before


def test_user_branch_and_work_stay_intact(git_tree, apply_cli):
    tree = git_tree("0.20.2")
    _git(tree, "switch", "-q", "-c", "my-work")
    (tree / "notes.txt").write_text("untracked work\n")
    head = _git(tree, "rev-parse", "my-work")
    assert apply_cli(tree)[0] == 0
    assert _git(tree, "rev-parse", "my-work") == head
    assert (tree / "notes.txt").read_text() == "untracked work\n"
    assert apply_cli("--revert", tree)[0] == 0
    assert _git(tree, "branch", "--show-current") == "my-work"


# --- bad input: one clear line, non-zero exit, nothing changed ------------------------------------


def _refused(apply_cli, tree, *args, match: str) -> None:
    before = tree_snapshot(tree)
    code, out, err = apply_cli(*args, tree)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert match in err, err
    assert tree_snapshot(tree) == before


def test_not_a_vllm_tree(tmp_path, apply_cli):
    (tmp_path / "README").write_text("hello\n")
    _refused(apply_cli, tmp_path, match="is not a vLLM source tree (no vllm/__init__.py)")


def test_release_without_the_file(plain_tree, apply_cli):
    tree = plain_tree("0.11.0")
    _refused(
        apply_cli,
        tree,
        match="has no vllm/distributed/kv_transfer/kv_connector/v1/lmcache_mp_connector.py",
    )


def test_release_older_than_the_series(plain_tree, apply_cli):
    tree = plain_tree("0.11.2")
    _refused(
        apply_cli, tree, match="vLLM 0.11.2 is not supported: its lmcache_mp_connector.py predates"
    )


def test_unsupported_release(git_tree, apply_cli):
    tree = git_tree("0.21.0")
    _refused(
        apply_cli,
        tree,
        "--vllm-version",
        "0.21.7",
        match="vLLM 0.21.7 has no series (supported: 0.12.0",
    )


def test_dirty_work_tree(git_tree, apply_cli):
    tree = git_tree("0.21.0")
    (tree / "setup.py").write_text((tree / "setup.py").read_text() + "\n# local\n")
    for args in ((), ("--check",), ("--force",)):
        _refused(
            apply_cli,
            tree,
            *args,
            match="has uncommitted changes (setup.py); commit or stash them first "
            "(--force does not override this: nothing was changed)",
        )
    assert (tree / "setup.py").read_text().endswith("\n# local\n")


def test_force_never_discards_uncommitted_work(git_tree, apply_cli):
    """An uncommitted edit to the connector file itself, and one elsewhere during --revert."""
    tree = git_tree("0.21.0")
    path = tree / CONNECTOR
    edited = path.read_text() + "\n# my uncommitted work\n"
    path.write_text(edited)
    _refused(apply_cli, tree, "--force", match="has uncommitted changes")
    assert path.read_text() == edited
    path.write_text(edited.removesuffix("\n# my uncommitted work\n"))
    code, _, err = apply_cli(tree)
    assert code == 0, err
    setup = tree / "setup.py"
    mine = setup.read_text() + "\n# mine\n"
    setup.write_text(mine)
    _refused(apply_cli, tree, "--revert", "--force", match="has uncommitted changes (setup.py)")
    _refused(apply_cli, tree, "--revert", "--check", match="has uncommitted changes (setup.py)")
    assert setup.read_text() == mine
    assert _git(tree, "rev-parse", "--abbrev-ref", "HEAD") == "vllm-lmcache-mp/v0.21.0"


def test_locally_modified_target_file(git_tree, apply_cli):
    tree = git_tree("0.19.1")
    path = tree / CONNECTOR
    path.write_text(path.read_text() + "\n# local change\n")
    _git(tree, "commit", "-qam", "local change")
    _refused(apply_cli, tree, match="matches neither vLLM 0.19.1's original nor the patched file")


def test_series_that_does_not_apply(git_tree, apply_cli):
    """--force on a conflicting file: git am -3 fails, and everything is put back."""
    tree = git_tree("0.17.1")
    path = tree / CONNECTOR
    path.write_text(path.read_text().replace("class LMCacheMPConnector(", "class MyConnector("))
    _git(tree, "commit", "-qam", "rename the class")
    _refused(apply_cli, tree, "--force", match="the series for vLLM 0.17.1 does not apply to")
    assert _git(tree, "branch", "--list", "vllm-lmcache-mp/*") == ""
    assert _git(tree, "status", "--porcelain") == ""


def test_plain_tree_modified_file(plain_tree, apply_cli):
    """The series replaces whole files in a plain tree: --force cannot merge a local change."""
    tree = plain_tree("0.14.1")
    path = tree / CONNECTOR
    path.write_text(path.read_text().replace("class LMCacheMPConnector(", "class MyConnector("))
    for args in ((), ("--force",), ("--check",)):
        _refused(
            apply_cli,
            tree,
            *args,
            match=f"error: {path} matches neither vLLM 0.14.1's original nor the patched file "
            "(local changes?); restore it (the series replaces whole files here, so --force "
            "cannot help)\n",
        )


def test_existing_series_branch(git_tree, apply_cli):
    tree = git_tree("0.21.0")
    _git(tree, "branch", "vllm-lmcache-mp/v0.21.0")
    for args in ((), ("--check",)):
        _refused(apply_cli, tree, *args, match="branch vllm-lmcache-mp/v0.21.0 already exists")


def test_undetectable_version(plain_tree, apply_cli):
    tree = plain_tree("0.21.0")
    (tree / "PKG-INFO").unlink()
    _refused(apply_cli, tree, match="cannot tell which vLLM release")


# --- installed vLLM (--python): bookkeeping on a minimal real install ----------------------------


def _record(site):
    return next(site.glob("vllm-*.dist-info")) / "RECORD"


@pytest.mark.parametrize("version", ["0.12.0", "0.21.0"])
def test_site_round_trip_keeps_record_true(manifest, fake_site, cli, apply_cli, version):
    python, site = fake_site(version)
    before = tree_snapshot(site)
    assert apply_cli("--python", python)[0] == 0
    assert (site / CONNECTOR).read_bytes() == _overlay(manifest, version)
    code, out, _ = cli("status", "--python", python)
    assert code == 0 and out.splitlines()[0] == "patched"
    eight = "upstream" if version == "0.21.0" else "applied"
    eleven = ", 0011 applied" if version == "0.12.0" else ""
    zero = "0000 applied, " if version == "0.12.0" else ""
    assert (
        f"{zero}0001 applied, 0002 applied, 0004 applied, 0007 applied, 0008 {eight}, "
        f"0009 applied{eleven}\n" in out
    )
    assert "0003" not in out and "0010" not in out
    assert_record_true(site)
    assert apply_cli("--python", python)[1].endswith("is already patched: nothing to do\n")
    assert apply_cli("--revert", "--python", python)[0] == 0
    assert tree_snapshot(site) == before


def test_site_read_only(fake_site, apply_cli):
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available to make a directory read-only as root")
    python, site = fake_site("0.21.0")
    folder = (site / CONNECTOR).parent
    before = tree_snapshot(site)
    subprocess.run(["chattr", "+i", folder], check=True)
    try:
        code, out, err = apply_cli("--python", python)
    finally:
        subprocess.run(["chattr", "-i", folder], check=True)
    assert (code, out) == (1, "") and "is not writable" in err and err.count("\n") == 1
    assert tree_snapshot(site) == before


def test_site_without_vllm(tmp_path, apply_cli):
    import sys

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "v"], check=True)
    code, _, err = apply_cli("--python", tmp_path / "v/bin/python")
    assert code == 1 and "no vllm is installed in" in err


def test_site_revert_without_apply(fake_site, apply_cli):
    python, _ = fake_site("0.21.0")
    code, out, _ = apply_cli("--revert", "--python", python)
    assert code == 0 and out.endswith("is not patched: nothing to revert\n")


def test_site_modified_after_patching(fake_site, apply_cli):
    """Refused; --force restores the backup (whole files, as apply found them)."""
    python, site = fake_site("0.21.0")
    original = tree_snapshot(site)
    assert apply_cli("--python", python)[0] == 0
    (site / CONNECTOR).write_text("# edited by hand\n")
    before = tree_snapshot(site)
    code, _, err = apply_cli("--revert", "--python", python)
    assert code == 1 and "matches neither" in err and "or pass --force to try anyway" in err
    assert tree_snapshot(site) == before
    assert apply_cli("--revert", "--force", "--python", python)[0] == 0
    assert tree_snapshot(site) == original


def test_site_modified_before_patching_is_refused_even_with_force(fake_site, apply_cli):
    python, site = fake_site("0.21.0")
    (site / CONNECTOR).write_text("# edited by hand\n")
    before = tree_snapshot(site)
    for args in ((), ("--force",)):
        assert apply_cli(*args, "--python", python) == (
            1,
            "",
            f"error: {site / CONNECTOR} matches neither vLLM 0.21.0's original nor the patched "
            "file (local changes?); restore it (the series replaces whole files here, so --force "
            "cannot help)\n",
        )
        assert tree_snapshot(site) == before


def test_plain_tree_with_one_file_restored_can_be_applied_and_reverted(plain_tree, apply_cli):
    tree = plain_tree("0.19.1")
    original = (tree / CONNECTOR).read_bytes()
    assert apply_cli(tree)[0] == 0
    patched = {p: (tree / p).read_bytes() for p in (CONNECTOR, FACTORY)}
    (tree / CONNECTOR).write_bytes(original)  # one of the two files put back by hand
    code, out, err = apply_cli(tree)
    assert code == 0, err
    assert {p: (tree / p).read_bytes() for p in patched} == patched
    (tree / CONNECTOR).write_bytes(original)
    code, out, err = apply_cli("--revert", tree)
    assert code == 0, err
    assert (tree / CONNECTOR).read_bytes() == original
    code, out, _ = apply_cli("--revert", tree)
    assert out.endswith("is not patched: nothing to revert\n")
