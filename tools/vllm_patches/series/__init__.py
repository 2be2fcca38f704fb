"""The patch series: its manifest, the overlay it yields, its rebase onto new releases.

A rebase checks the changed files with the new release's own hooks (``hooks``).
"""
