"""Plans: one build step as data, and the hash that names it.

A :class:`Plan` is what evaluating a recipe yields: a builder name, parameters
and inputs (other plans, or local files already hashed). It is pure data;
nothing runs. Its *hash* also needs what only the realizer knows, the
builder's version and the versions of the external tools it runs, so hashing
takes them as arguments and stays pure.

Grammar of the hashed plan record (canonical msgpack)::

    {"format": 1,
     "builder": str, "version": int,
     "tools": {tool name: version string, ...},
     "inputs": {input name: {"plan": plan hash} | {"source": blob id}, ...},
     "params": {param name: value, ...}}

What is not hashed: the display name, where in a recipe file the plan was
made, local file paths (only their content ids are), and the *hints* of a
fixed-output plan: what its builder needs but its output cannot depend on,
since the declared hash names the output (a fetch's URL, as a Nix
fixed-output derivation's). A mirror that moves rebuilds nothing, and a
realisation found under another URL is the same one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from castore import canonical
from castore.errors import EncodingError
from castore.hashing import hash_bytes

FORMAT = 1
OUTPUT_KINDS = ("blob", "tree", "image")


@dataclass(frozen=True)
class Source:
    """A local file a recipe reads; only its content id enters the hash."""

    path: str
    id: str
    size: int


@dataclass(eq=False)
class Plan:
    builder: str
    output: str
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Plan | Source] = field(default_factory=dict)
    name: str = ""
    origin: str = ""
    hints: dict[str, Any] = field(default_factory=dict)  # given to the builder with params; not hashed

    def __post_init__(self) -> None:
        assert self.output in OUTPUT_KINDS, self.output
        # Validate eagerly so a bad parameter is reported at its recipe line. The recipe DSL checks
        # types first; this is the backstop for what msgpack itself cannot take.
        try:
            canonical.encode([self.params, self.hints])
        except UnicodeEncodeError as exc:
            raise EncodingError(f"a parameter of {self.label} is not valid UTF-8 text: "
                                f"{exc.object[exc.start:exc.end]!r} ({exc.reason})") from None
        except OverflowError:
            raise EncodingError(f"an integer parameter of {self.label} is out of range (-2**63 to 2**64-1)") from None

    def __repr__(self) -> str:
        return f"<Plan {self.builder} {self.name or ''} at {self.origin}>"

    @property
    def label(self) -> str:
        return self.name or self.builder

    def plan_inputs(self) -> Iterator[Plan]:
        for value in self.inputs.values():
            if isinstance(value, Plan):
                yield value

    def sources(self) -> Iterator[Source]:
        for value in self.inputs.values():
            if isinstance(value, Source):
                yield value


def walk(root: Plan) -> list[Plan]:
    """All plans reachable from root, each once, inputs before their users."""
    order: list[Plan] = []
    seen: set[int] = set()
    stack: list[tuple[Plan, bool]] = [(root, False)]
    while stack:
        plan, expanded = stack.pop()
        if expanded:
            order.append(plan)
            continue
        if id(plan) in seen:
            continue
        seen.add(id(plan))
        stack.append((plan, True))
        for child in reversed(list(plan.plan_inputs())):
            if id(child) not in seen:
                stack.append((child, False))
    return order


def plan_record(
    plan: Plan, version: int, tools: Mapping[str, str], input_hashes: Mapping[str, str]
) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for name, value in plan.inputs.items():
        if isinstance(value, Plan):
            inputs[name] = {"plan": input_hashes[name]}
        else:
            inputs[name] = {"source": value.id}
    return {
        "format": FORMAT,
        "builder": plan.builder,
        "version": version,
        "tools": dict(tools),
        "inputs": inputs,
        "params": plan.params,
    }


def encode_record(record: Mapping[str, Any]) -> bytes:
    return canonical.encode(record)


def hash_record(record: Mapping[str, Any]) -> str:
    return hash_bytes(encode_record(record))


Describe = Callable[[Plan], tuple[int, Mapping[str, str]]]


def hash_graph(root: Plan, describe: Describe) -> tuple[list[Plan], dict[int, tuple[str, bytes]]]:
    """Hash every plan under root; returns (plans in build order, id(plan) -> (hash, record bytes)).

    ``describe`` gives a plan's builder version and tool versions.
    """
    order = walk(root)
    done: dict[int, tuple[str, bytes]] = {}
    for plan in order:
        version, tools = describe(plan)
        input_hashes = {
            name: done[id(value)][0] for name, value in plan.inputs.items() if isinstance(value, Plan)
        }
        data = encode_record(plan_record(plan, version, tools, input_hashes))
        done[id(plan)] = (hash_bytes(data), data)
    return order, done
