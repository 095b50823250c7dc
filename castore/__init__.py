"""castore: build, share and deploy Firecracker microVM images from a content-addressed store.

The public recipe API. Recipes are Python functions decorated with
:func:`recipe`; the builders below return plans and build nothing until
``castore realize``.
"""

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
