"""Builders: one module per builder, read-only input paths in, one output out.

A builder never touches the store. The realizer hands it a :class:`BuildContext`
(a private scratch directory, the output path, its parameters and its inputs
as read-only paths or decoded manifests) and moves what it returns into the
store. That keeps every builder testable with a temporary directory.

A builder declares a ``version`` (bump it whenever its output for the same
plan could change) and the external ``tools`` it runs; both go into the plan
hash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from castore.manifest import Image, Tree


@dataclass(frozen=True)
class BlobInput:
    id: str
    path: Path
    size: int


@dataclass(frozen=True)
class TreeInput:
    id: str
    tree: Tree


Input = BlobInput | TreeInput


@dataclass
class BuildContext:
    scratch: Path
    out: Path
    params: dict[str, Any]
    inputs: dict[str, Input]
    plan_hash: str
    blob_path: Callable[[str], Path]
    log: BinaryIO
    status: Callable[[str], None] = lambda text: None
    jobs: int = 2

    def blob(self, name: str) -> BlobInput:
        value = self.inputs[name]
        assert isinstance(value, BlobInput), f"input {name} is not a blob"
        return value

    def tree(self, name: str) -> TreeInput:
        value = self.inputs[name]
        assert isinstance(value, TreeInput), f"input {name} is not a tree"
        return value


@dataclass(frozen=True)
class BlobResult:
    """The builder wrote its output file at ``ctx.out``."""


@dataclass(frozen=True)
class ExistingResult:
    """The output is an object that is already in the store (an input, or part of one)."""

    id: str


@dataclass(frozen=True)
class TreeResult:
    tree: Tree
    new_blobs: dict[str, Path] = field(default_factory=dict)  # id -> file in scratch


@dataclass(frozen=True)
class ImageResult:
    image: Image


Result = BlobResult | ExistingResult | TreeResult | ImageResult


class Builder(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def tools(self) -> tuple[str, ...]: ...

    def build(self, ctx: BuildContext) -> Result: ...


def registry() -> dict[str, Builder]:
    from castore.builders import debian, ext4, fetch, image, kernel, squashfs, treeops, unpack

    found: list[Builder] = [
        fetch.FETCH, debian.DEBIAN_PACKAGE, unpack.UNPACK, treeops.TREE, treeops.TREE_GET,
        treeops.SOURCE, squashfs.SQUASHFS, ext4.EXT4, kernel.KERNEL, image.IMAGE,
    ]
    return {b.name: b for b in found}


@dataclass(frozen=True)
class FnBuilder:
    name: str
    version: int
    tools: tuple[str, ...]
    fn: Callable[[BuildContext], Result]

    def build(self, ctx: BuildContext) -> Result:
        return self.fn(ctx)
