"""bench/ablate.py's patches still apply to the gateway as it is, and each patched copy still imports.

The benchmark measures what a feature costs by cutting it out of a copy; a patch whose text moved would
otherwise be found only by the next person who runs the benchmark.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def _import_ablate() -> ModuleType:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import ablate
    finally:
        sys.path.remove(str(REPO / "bench"))
    return ablate


ablate = _import_ablate()


@pytest.mark.parametrize("name", [*ablate.ABLATIONS, ablate.ALL])
def test_each_ablation_applies_and_the_copy_imports(name: str, tmp_path: Path) -> None:
    names = list(ablate.ABLATIONS) if name == ablate.ALL else [name]
    root = ablate.ablated_copy(names, tmp_path)
    for module in {patch.module for n in names for patch in ablate.ABLATIONS[n].patches}:
        assert (root / "gateway_app" / module).read_text() != (REPO / "gateway_app" / module).read_text()
    # The copy, not this tree, is what a gateway started from `root` imports.
    probe = "import gateway_app.server, gateway_app.app as app; print(app.__file__)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(root)


def test_a_patch_that_no_longer_applies_stops_the_run_naming_it(tmp_path: Path) -> None:
    stale = ablate.Ablation("nothing", (ablate.Patch("app.py", "text that is not in app.py", ""),))
    ablate.ABLATIONS["stale"] = stale
    try:
        with pytest.raises(SystemExit, match="ablation `stale`: gateway_app/app.py no longer holds"):
            ablate.ablated_copy(["stale"], tmp_path)
    finally:
        del ablate.ABLATIONS["stale"]
