"""Builders: one module per builder, read-only input paths in, one output out.

A builder never touches the store. The realizer hands it a :class:`BuildContext`
(a private scratch directory, the output path, its parameters and its inputs
as read-only paths or decoded manifests) and moves what it returns into the
store. That keeps every builder testable with a temporary directory.

Each builder's ``version`` (bump it whenever its output for the same plan
could change) and the external ``tools`` it runs are declared in :data:`SPECS`,
so plans hash without importing the builders; both go into the plan hash.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from castore.manifest import Image, Tree


@dataclass(frozen=True)
class BlobInput:
    id: str
    path: Path
    size: int
    label: str = ""  # what the recipe calls it (the input plan's name, or the local file's path)


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


Build = Callable[[BuildContext], Result]


@dataclass(frozen=True)
class Spec:
    """What a plan hash needs to know of a builder, readable without importing the builder."""

    module: str
    version: int  # bump whenever the builder's output for the same plan could change
    tools: tuple[str, ...] = ()  # external programs it runs; their version lines enter the hash
    libraries: tuple[str, ...] = ()  # sonames of what programs it compiles load; their file names too
    more_tools: bool = False  # a plan may name more tools, in params["tools"]: versioned alike

    def tools_of(self, params: dict[str, Any]) -> tuple[str, ...]:
        return (*self.tools, *params.get("tools", ())) if self.more_tools else self.tools


SPECS: dict[str, Spec] = {
    "fetch": Spec("fetch", 1),
    "debian_package": Spec("debian", 1),  # fixed-output: the sha256 decides, apt's version stays out
    "unpack": Spec("unpack", 2),  # 2: a name added again keeps its hard links' old content
    "tree": Spec("treeops", 3),  # 2: hard links and implicit parents as on a filesystem; 3: no chmod of a symlink
    "tree_get": Spec("treeops", 1),
    "source": Spec("treeops", 1),
    "squashfs": Spec("squashfs", 2, ("gensquashfs",)),  # 2: link targets raw, devices in range
    "ext4": Spec("ext4", 1, ("mke2fs",)),
    # 2: only these on the sandbox's PATH. All it runs, traced (strace -f -e execve), but git and
    # pkg-config: hidden, they answer as they do where the sources are no git checkout (ours) and
    # libelf needs no flags (Debian's).
    "kernel": Spec("kernel", 2, (
        "make", "sh", "gcc", "as", "ld", "ar", "nm", "objcopy", "objdump", "flex", "bison", "m4", "bc", "perl",
        "awk", "sed", "grep", "find", "xargs", "diff", "cmp", "getconf", "basename", "cat", "cp", "cut", "dirname",
        "env", "expr", "head", "mkdir", "mktemp", "mv", "rm", "sha1sum", "sort", "tail", "touch", "tr", "uname",
        "uniq", "wc", "tar", "xz", "bwrap"), ("libelf.so.1",), more_tools=True),
    "image": Spec("image", 2),  # 2: kernel and layers checked
}


def load(name: str) -> Build:
    """The build function of a builder; its module is imported only when something is built."""
    module = importlib.import_module(f"castore.builders.{SPECS[name].module}")
    build: Build = module.BUILD[name]
    return build
