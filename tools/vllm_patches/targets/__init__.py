"""Where the series goes: a git checkout, a plain tree, an installed vLLM, a wheel."""
