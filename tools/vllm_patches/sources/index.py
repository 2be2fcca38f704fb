"""The package indexes pip is configured with, read through pip's public command line.

pip's whole configuration applies: ``index-url`` and ``extra-index-url`` (environment first,
then the ``download`` and ``global`` sections), ``cert`` and ``client-cert``, credentials in
an index URL or in ``~/.netrc``. No index is named here: without one configured, pip's own
default is read from ``pip download --help``. Credentials never appear in a message.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import netrc
import re
import shutil
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import IO

from vllm_patches._proc import logger, run_subprocess
from vllm_patches.errors import PatchToolError

SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
_SECTIONS = (":env:", "download", "global")
"""Where pip's own precedence looks for an option, first match wins."""


@dataclass(frozen=True)
class IndexConfig:
    """What pip would use to reach the indexes."""

    urls: tuple[str, ...]
    """The index first, then the extra indexes, each ending in ``/``."""
    cert: str | None = None
    client_cert: str | None = None


def redact(url: str) -> str:
    """``url`` without its password (pip's own style: ``user:****@host``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:****@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@functools.cache
def pip_command() -> tuple[str, ...]:
    """The pip to run: this interpreter's, else one on PATH (a venv made by uv has none)."""
    if importlib.util.find_spec("pip") is not None:
        return (sys.executable, "-m", "pip")
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            logger.warning("%s has no pip; using %s", sys.executable, found)
            return (found,)
    python = shutil.which("python3")
    if python and run_subprocess([python, "-m", "pip", "--version"], check=False).returncode == 0:
        logger.warning("%s has no pip; using %s -m pip", sys.executable, python)
        return (python, "-m", "pip")
    msg = f"no pip found ({sys.executable} has none, nor PATH); install pip and run again"
    raise PatchToolError(msg)


def _pip_options() -> dict[str, str]:
    proc = run_subprocess([*pip_command(), "config", "list"], check=False)
    found: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        match = re.fullmatch(r"([^.\s]+)\.([\w-]+)='(.*)'", line.strip())
        if match:
            found[f"{match[1]}.{match[2]}"] = match[3]
    return found


def _option(options: dict[str, str], name: str) -> str | None:
    return next((options[f"{s}.{name}"] for s in _SECTIONS if f"{s}.{name}" in options), None)


def _pips_default_index() -> str:
    proc = run_subprocess([*pip_command(), "download", "--help"], check=False)
    text = " ".join(proc.stdout.split())
    match = re.search(
        r"--index-url <url> Base URL of the Python Package Index \(default (\S+)\)", text
    )
    if not match:
        msg = "cannot tell pip's default index; set PIP_INDEX_URL or pip config global.index-url"
        raise PatchToolError(msg)
    return match[1]


@functools.cache
def config() -> IndexConfig:
    """pip's index configuration, read once per process."""
    options = _pip_options()
    main = _option(options, "index-url") or _pips_default_index()
    extra = (_option(options, "extra-index-url") or "").split()
    urls = tuple(dict.fromkeys(u.rstrip("/") + "/" for u in [main, *extra]))
    return IndexConfig(urls, _option(options, "cert"), _option(options, "client-cert"))


def _context(cfg: IndexConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cfg.cert)
    if cfg.client_cert:
        context.load_cert_chain(cfg.client_cert)
    return context


def _request(url: str, accept: str | None = None) -> urllib.request.Request:
    """A request for ``url`` with its credentials (from the URL, else netrc) as Basic auth."""
    parts = urllib.parse.urlsplit(url)
    user, password = parts.username, parts.password
    if user is None and parts.hostname and parts.scheme in ("http", "https"):
        try:
            entry = netrc.netrc().authenticators(parts.hostname)
        except (FileNotFoundError, netrc.NetrcParseError):
            entry = None
        if entry:
            user, password = entry[0], entry[2]
    if parts.hostname:
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    request = urllib.request.Request(url)
    if accept:
        request.add_header("Accept", accept)
    if user is not None:
        token = base64.b64encode(
            f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}".encode()
        )
        request.add_header("Authorization", f"Basic {token.decode()}")
    return request


def open_url(url: str, *, accept: str | None = None, timeout: float = 120) -> IO[bytes]:
    """Open ``url`` as pip would (certificates, credentials); errors never show a password."""
    request = _request(url, accept)
    context = _context(config()) if request.full_url.startswith("https:") else None
    try:
        return urllib.request.urlopen(request, timeout=timeout, context=context)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        msg = f"cannot read {redact(url)} ({reason}); check pip's index configuration"
        raise PatchToolError(msg) from None


def project_files(project: str) -> list[tuple[str, dict]]:
    """(page URL, file entry) of ``project`` on every configured index, the main one first.

    An index that does not have the project (or cannot be read) is skipped, as pip does
    with extra indexes; if none can be read, the error names them all (redacted).
    """
    found: list[tuple[str, dict]] = []
    problems: list[str] = []
    for index in config().urls:
        page = index + f"{project}/"
        try:
            with open_url(page, accept=SIMPLE_JSON) as response:
                data = json.load(response)
        except (PatchToolError, ValueError) as exc:
            logger.debug("index %s: %s", redact(index), exc)
            problems.append(redact(index))
            continue
        found += [(page, entry) for entry in data.get("files", [])]
    if not found and problems:
        msg = (
            f"cannot read {project} from the package index ({', '.join(problems)}); check "
            "pip's index configuration (pip config list)"
        )
        raise PatchToolError(msg)
    return found
