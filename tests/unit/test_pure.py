"""The pure layer imports no I/O: no event loop, sockets, LMDB or thread pools
(docs/design.md; STYLE.md's module map). Checked in a fresh interpreter, where
nothing else has imported them already."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import sheep

pure_modules = ["sheep.constants", "sheep.errors", "sheep.proto", "sheep.oid", "sheep.ring",
                "sheep.radix", "sheep.cluster_state", "sheep.vdi_registry", "sheep.node",
                "sheep.size", "sheep.replicas", "sheep.mclock", "sheep.changes", "sheep.health",
                "sheep.legacy_ring"]
forbidden = ["asyncio", "socket", "selectors", "lmdb", "concurrent.futures"]


def test_the_pure_modules_import_no_io() -> None:
    modules = [name for name in pure_modules if importlib.util.find_spec(name) is not None]
    assert "sheep.cluster_state" in modules and "sheep.radix" in modules
    script = (f"import importlib, json, sys\n"
              f"for name in {modules!r}:\n"
              f"    importlib.import_module(name)\n"
              f"print(json.dumps(sorted(name for name in {forbidden!r} if name in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=True, cwd=Path(sheep.__file__).parents[1])
    assert json.loads(result.stdout) == []
