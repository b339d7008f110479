"""Loading a script of benchmarks/ as a module for a test (the scripts are not a package)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path


@contextlib.contextmanager
def benchmark_module(name: str, also_imports: tuple[str, ...] = ()):
    """``benchmarks/<name>.py`` executed as module ``gradleak_<name>`` (registered in ``sys.modules``
    while the file executes: dataclasses look their module up); on exit the module and the
    benchmark modules it imported from ``benchmarks/`` (``also_imports``) are forgotten."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gradleak_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        for imported in also_imports:
            sys.modules.pop(imported, None)
