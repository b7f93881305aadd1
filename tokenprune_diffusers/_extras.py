"""What to install when an optional dependency is missing (the one place the hint is written).

The package's ``__init__`` imports this module first: on a base install (no ``[diffusion]`` extra)
``import tokenprune_diffusers`` then fails with an ImportError that says what to install, instead of
``No module named 'diffusers.hooks'`` from deep inside. Imports nothing but the standard library.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version

__all__ = ["DISTRIBUTION", "DIFFUSION_INSTALL", "MIN_DIFFUSERS", "check_diffusion_extra"]

DISTRIBUTION = "tokenprune-diffusers"
DIFFUSION_INSTALL = f"pip install '{DISTRIBUTION}[diffusion]'"
MIN_DIFFUSERS = "0.33"  # diffusers.hooks (ModelHook, HookRegistry); keep in step with pyproject.toml
# the modules of the [diffusion] extra that importing the package needs
_REQUIRED = ("diffusers", "diffusers.hooks", "transformers")


def check_diffusion_extra() -> None:
    """Raises ImportError naming the extra when a module the package imports is missing."""
    for name in _REQUIRED:
        top = name.split(".")[0]
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package is missing
            found = False
        except ValueError:  # imported already, without a spec
            found = True
        if found:
            continue
        if top == name:
            raise ImportError(f"tokenprune_diffusers needs the 'diffusion' extra ({name} is not installed): "
                              f"{DIFFUSION_INSTALL}")
        try:
            have = version(top)
        except PackageNotFoundError:
            have = "unknown"
        raise ImportError(f"tokenprune_diffusers needs {top} >= {MIN_DIFFUSERS} (it has no module {name!r}; "
                          f"installed: {have}): {DIFFUSION_INSTALL} --upgrade")


check_diffusion_extra()
