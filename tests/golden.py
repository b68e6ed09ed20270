"""Golden-file comparison: `FORGE_UPDATE_GOLDEN=1 pytest …` rewrites the files after review."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden"


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN_DIR / name
    if os.environ.get("FORGE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing golden file {path}; run with FORGE_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{path} differs; rerun with FORGE_UPDATE_GOLDEN=1 if intended"
