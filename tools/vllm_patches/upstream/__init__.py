"""Sending the change to vLLM: the pull request, checked with vLLM's own hooks and tests."""
