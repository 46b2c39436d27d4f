"""docs/embedding.md is real: its ``python`` blocks run, in order, in one namespace, in an
empty directory."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
from regionvault.core import RegionVaultError, Site
from site_support import enter_workdir

DOC = Path(__file__).resolve().parent.parent / "docs" / "embedding.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_embedding_guide_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 10
    enter_workdir(tmp_path, monkeypatch, init=False)  # the guide writes its own site.toml
    namespace: dict[str, object] = {"__name__": "embedding_doc"}
    try:
        for number, block in enumerate(blocks, 1):
            code = compile(block, f"{DOC.name} block {number}", "exec")
            exec(code, namespace)
    finally:
        # whatever a failing block left running is stopped
        with Site.load(tmp_path / "site.toml") as site:
            for region in site.regions:
                for instance in region.compute.list_instances():
                    if instance.state == "running" and instance.extra.get("pid"):
                        with contextlib.suppress(RegionVaultError):
                            region.compute.terminate(instance.id)
