"""castore: build, share and deploy Firecracker microVM images from a content-addressed store.

The public recipe API. Recipes are Python functions decorated with
:func:`recipe`; the builders below return plans and build nothing until
``castore realize``. Names are imported on first use, so commands that never
evaluate a recipe do not pay for the recipe machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "debian_package",
    "ext4",
    "fetch",
    "get",
    "image",
    "kernel",
    "local_file",
    "recipe",
    "squashfs",
    "tree",
    "unpack",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from castore.recipes import (
        debian_package,
        ext4,
        fetch,
        get,
        image,
        kernel,
        local_file,
        recipe,
        squashfs,
        tree,
        unpack,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        from castore import recipes

        return getattr(recipes, name)
    raise AttributeError(f"module 'castore' has no attribute {name!r}")
