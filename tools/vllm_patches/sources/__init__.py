"""Where vLLM comes from: the package index, sdists, git checkouts, venvs."""
