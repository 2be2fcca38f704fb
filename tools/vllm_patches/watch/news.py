"""What the package index has that the series and the pairing table do not."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from packaging.version import Version

from vllm_patches.diagnosis.matrix.measure import FIRST_LMCACHE
from vllm_patches.diagnosis.matrix.verdicts import shipped
from vllm_patches.series.manifest import load_manifest
from vllm_patches.sources.releases import final_releases, list_sdists


@dataclass(frozen=True)
class News:
    """Releases on the index that the project does not cover yet, oldest first."""

    vllm: list[str]
    """vLLM releases newer than the series' newest."""
    vllm_sdist: dict[str, bool]
    """Whether each of those ships an sdist (a rebase needs one)."""
    vllm_missing: list[str]
    """vLLM releases within the series' range that have no series and are not refused."""
    table_rows: list[str]
    """vLLM releases with a series but no row in the pairing table."""
    lmcache: list[str]
    """lmcache releases the pairing table has no column for."""

    def as_dict(self) -> dict:
        """What ``releases --json`` prints."""
        return asdict(self)

    @property
    def empty(self) -> bool:
        return not (self.vllm or self.vllm_missing or self.table_rows or self.lmcache)

    def lines(self) -> list[str]:
        """What ``releases`` prints for people."""
        if self.empty:
            return ["nothing new: the series and the pairing table cover every release"]
        out = []
        for version in self.vllm:
            how = (
                f"vllm-patches rebase --onto {version}"
                if self.vllm_sdist[version]
                else "vllm-patches watch (it ships wheels only; its files are compared with "
                "the series' bases)"
            )
            out.append(f"vLLM {version}: new, no series yet; carry it with {how}")
        out += [
            f"vLLM {v}: on the index but not in the series; carry it with "
            f"vllm-patches watch --vllm {v}"
            for v in self.vllm_missing
        ]
        out += [
            f"vLLM {v}: no row in the pairing table; measure it with "
            f"vllm-patches matrix --vllm {v} --lmcache all"
            for v in self.table_rows
        ]
        out += [
            f"lmcache {v}: no column in the pairing table; measure it with "
            f"vllm-patches matrix --vllm all --lmcache {v}"
            for v in self.lmcache
        ]
        return out


def news() -> News:
    """Read the index (through pip's configuration) and compare it with the series and table."""
    manifest = load_manifest()
    known = set(manifest.releases) | set(manifest.unsupported)
    newest = max(manifest.releases, key=Version)
    on_index = final_releases("vllm", min(manifest.releases, key=Version))
    newer = [v for v in on_index if Version(v) > Version(newest)]
    sdists = list_sdists() if newer else {}
    table = shipped()["measured"]
    return News(
        vllm=newer,
        vllm_sdist={v: v in sdists for v in newer},
        vllm_missing=[v for v in on_index if Version(v) <= Version(newest) and v not in known],
        table_rows=[v for v in sorted(manifest.releases, key=Version) if v not in table["vllm"]],
        lmcache=[v for v in final_releases("lmcache", FIRST_LMCACHE) if v not in table["lmcache"]],
    )
