"""The shared spec vectors (../shared/spec/vectors/v1.json), located from the repo."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def vectors_path() -> Path:
    override = os.environ.get("MSGD_VECTORS")
    candidates = [Path(override)] if override else []
    candidates += [ROOT.parent / "shared" / "spec" / "vectors" / "v1.json",
                   ROOT / "shared" / "spec" / "vectors" / "v1.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "spec vectors not found: expected ../shared/spec/vectors/v1.json beside the checkout "
        "(or set MSGD_VECTORS)")


VECTORS = json.loads(vectors_path().read_text())
VALID = {v["name"]: v for v in VECTORS["valid"]}
INVALID = {v["name"]: v for v in VECTORS["invalid"]}

# msgd's wire v1.1 vectors (docs/protocol.md §6.5), written by hand beside the tests.
V1_1 = json.loads((ROOT / "tests" / "wire" / "vectors_v1_1.json").read_text())
V1_1_VALID = {v["name"]: v for v in V1_1["valid"]}
