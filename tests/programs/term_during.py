"""Run one of the tool's commands and send it SIGTERM when it reaches a given function.

Usage: python term_during.py MODULE:FUNCTION ENTRY ARGS... (ENTRY: main, apply_main,
rebase_main or upstream_main of vllm_patches.__main__). The function still runs after the
signal is sent, as it would when a ``kill`` arrives at that moment.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from vllm_patches import __main__ as cli

if __name__ == "__main__":
    module_name, attr = sys.argv[1].split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, attr)

    def _terminated(*args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    setattr(module, attr, _terminated)
    sys.exit(getattr(cli, sys.argv[2])(sys.argv[3:]))
