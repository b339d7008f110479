"""Make ``torchvision`` importable when its compiled operators cannot load.

The torchvision 0.28.0 wheel on the package registry is a CUDA build. Next to the CPU
build of torch its ``_C`` extension fails to load, and ``import torchvision`` then raises
``operator torchvision::nms does not exist`` while registering the fake kernels of
``nms``. That also breaks every package that imports torchvision (torchmetrics' image
metrics among them).

:func:`ensure_torchvision_importable` declares the two missing operator schemas
(``nms`` and ``qnms``) so that the pure-Python parts (models, transforms) import. It does
so only when loading torchvision's own ``_C`` library fails, so it is a no-op where
torchvision is whole. ``torchvision.ops.nms`` and ``torchvision.io`` decoding stay
unavailable in the patched case; gradleak decodes images with Pillow and never needs them.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import torch

__all__ = ["ensure_torchvision_importable", "torchvision_patched"]

log = logging.getLogger(__name__)

# The Library object must stay alive: its registrations are removed when it is collected.
_FALLBACK_LIBRARY: torch.library.Library | None = None

_MISSING_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _compiled_extension() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for candidate in sorted(Path(location).glob("_C*")):
            if candidate.suffix in {".so", ".pyd", ".dylib"}:
                return candidate
    return None


def torchvision_patched() -> bool:
    """True when gradleak had to declare torchvision's operator schemas itself."""
    return _FALLBACK_LIBRARY is not None


def ensure_torchvision_importable(load_library=torch.ops.load_library) -> bool:
    """Declare ``torchvision::nms``/``qnms`` if torchvision's ``_C`` cannot be loaded.

    Returns True if the fallback schemas were declared (now or earlier), False if
    torchvision is absent, already imported, or whole. ``load_library`` is injectable for
    tests.
    """
    global _FALLBACK_LIBRARY
    if _FALLBACK_LIBRARY is not None:
        return True
    if "torchvision" in sys.modules:
        return False  # imported already: whatever state it is in, do not touch it
    extension = _compiled_extension()
    if extension is None:
        return False
    try:
        load_library(str(extension))
        return False  # whole: torchvision will find its operators
    except (OSError, RuntimeError) as error:
        log.debug("torchvision's compiled ops do not load (%s); declaring nms/qnms schemas", error)
    if hasattr(torch.ops.torchvision, "nms"):
        return False
    library = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_SCHEMAS:
        library.define(schema)
    _FALLBACK_LIBRARY = library
    return True
