"""Peers' MoE kernels, run side by side from the ignored ``third_party/`` folder (never committed).

    third_party/scattermoe/   a checkout of github.com/shawntan/scattermoe (the original ScatterMoE)
    third_party/sonic-moe/    a checkout of github.com/Dao-AILab/sonic-moe (SonicMoE; needs its own
                              requirements: nvidia-cutlass-dsl, quack-kernels)

``SCATTERMOE_THIRD_PARTY`` names another folder. The original ScatterMoE's package is also called
``scattermoe``, and it registers torch custom ops in the same ``scattermoe::`` namespace as this
library (``scattermoe::scatter2scatter``, ...): loaded as it is, its definitions would replace
ours in the process. So it is loaded under the name ``scattermoe_original`` (its modules import
each other relatively) with its op namespace renamed ``scattermoe_original::`` as its source is
compiled; the file on disk is not changed. Each loader returns (module, None) or
(None, why not), and the benchmark records the reason in the row of an implementation it
could not run. bench/README.md says how to bring the checkouts onto a GPU machine without internet.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

from .harness import REPO_ROOT


def third_party_dir() -> Path:
    return Path(os.environ.get("SCATTERMOE_THIRD_PARTY", REPO_ROOT / "third_party"))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


class _RenamedOpsLoader(importlib.machinery.SourceFileLoader):
    """Compiles the original ScatterMoE's source with its custom-op namespace renamed (no .pyc)."""

    def get_code(self, fullname):
        path = self.get_filename(fullname)
        text = Path(path).read_text().replace('"scattermoe::', '"scattermoe_original::')
        return compile(text, path, "exec", dont_inherit=True)


class _OriginalFinder(importlib.abc.MetaPathFinder):
    """Finds ``scattermoe_original[.sub]`` modules in the checkout's ``scattermoe/`` package."""

    def __init__(self, pkg: Path) -> None:
        self.pkg = pkg

    def find_spec(self, fullname, path, target=None):
        if fullname != "scattermoe_original" and not fullname.startswith("scattermoe_original."):
            return None
        base = self.pkg.joinpath(*fullname.split(".")[1:])
        if (base / "__init__.py").is_file():
            file = base / "__init__.py"
            return importlib.util.spec_from_file_location(fullname, file, loader=_RenamedOpsLoader(fullname, str(file)),
                                                          submodule_search_locations=[str(base)])
        if base.with_suffix(".py").is_file():
            file = base.with_suffix(".py")
            return importlib.util.spec_from_file_location(fullname, file, loader=_RenamedOpsLoader(fullname, str(file)))
        return None


def load_scattermoe_original() -> Tuple[Optional[ModuleType], Optional[str]]:
    """The original ScatterMoE package (its ``mlp.GLUMLP``) as ``scattermoe_original``."""
    if "scattermoe_original" in sys.modules:
        return sys.modules["scattermoe_original"], None
    pkg = third_party_dir() / "scattermoe" / "scattermoe"
    if not (pkg / "__init__.py").is_file():
        return None, f"not found: {pkg} (see bench/README.md, 'Peers')"
    if not any(isinstance(f, _OriginalFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _OriginalFinder(pkg))
    try:
        return importlib.import_module("scattermoe_original"), None
    except Exception as exc:  # a peer that does not import is a finding for the row, not a crash
        for name in [n for n in sys.modules if n.split(".")[0] == "scattermoe_original"]:
            del sys.modules[name]
        return None, f"import failed: {_describe(exc)}"


def load_sonicmoe() -> Tuple[Optional[ModuleType], Optional[str]]:
    """SonicMoE's package (``sonicmoe.MoE``), from third_party/sonic-moe or an installed copy."""
    root = third_party_dir() / "sonic-moe"
    if (root / "sonicmoe" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if importlib.util.find_spec("sonicmoe") is None:
        return None, f"not found: {root} and no installed sonicmoe (see bench/README.md, 'Peers')"
    try:
        return importlib.import_module("sonicmoe"), None
    except Exception as exc:
        return None, f"import failed: {_describe(exc)}"
