"""transformers' torchvision-only image processors, imported with a stand-in for torchvision.

Their arithmetic (canvases, grids, resizes, patches) uses torch and math alone; only the resizes and pads
a test does not run need torchvision. The PIL ports in vlmtune/model/ are checked against these.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

TORCHVISION = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2")


def image_processing_module(model_type: str) -> Any:
    """transformers.models.MODEL_TYPE.image_processing_MODEL_TYPE, loaded from its file under a name of its own
    while stand-ins hold torchvision's place in sys.modules (put back afterwards)."""
    package = importlib.import_module(f"transformers.models.{model_type}")
    stand_ins = {name: types.ModuleType(name) for name in TORCHVISION}
    stand_ins["torchvision.transforms.v2"].functional = types.ModuleType("functional")
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        path = f"{package.__path__[0]}/image_processing_{model_type}.py"
        spec = importlib.util.spec_from_file_location(
            f"transformers.models.{model_type}._vlmtune_upstream", path
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its class decorators read their own source file
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module
