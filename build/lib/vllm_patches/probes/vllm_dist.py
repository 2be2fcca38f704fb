"""Where vLLM is installed in this interpreter: one JSON line (``null`` if it is not).

Run by path inside the target interpreter; it imports only the standard library.
"""

from __future__ import annotations

import importlib.metadata as md
import json


def main() -> None:
    """Print the installed vLLM's version, site directory and dist-info."""
    try:
        dist = md.distribution("vllm")
    except md.PackageNotFoundError:
        print(json.dumps(None))
        return
    info = {
        "version": dist.version,
        "site": str(dist.locate_file("")),
        "dist_info": str(getattr(dist, "_path", "")),
    }
    print(json.dumps(info))


if __name__ == "__main__":
    main()
