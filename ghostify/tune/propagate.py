"""Stage-wise propagation: one traced graph run node by node over *all* calibration batches.

GPTQ's sequential calibration, on our kept fx graphs: two environments of live values, the
student's (the model being calibrated) and the teacher's (its frozen original), each value held
for every batch (``store.Values``) and released after its last user. Nodes run in graph order,
each over every batch before the next node starts, so when a converted layer is reached, its
inputs in the partially calibrated student and its original's outputs in the teacher are there
for every batch: the layer is fitted on them (``Roles.fit``), then its outputs computed with the
fitted weights. A node whose inputs are the same in both models (everything before the first
converted layer) is computed once and shared. Nodes that lead to no layer of interest are not
run at all.

The caller says what each module call is (``Roles``): fitted here, prepared before it runs
(a BatchNorm re-estimated on the student's inputs, a layer fitted by the per-layer fallback), or
plain.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from .store import Store, Values

FIT = "fit"
PREPARE = "prepare"


@dataclass
class Roles:
    """What the propagation does at the calls of modules (qualified names) of interest."""

    role: Callable[[str], str | None]  # FIT, PREPARE or None (plain)
    fit: Callable[[str, Values, Values], Values]  # (name, student inputs, teacher outputs)
    prepare: Callable[[str, Values | None], None]  # (name, student inputs) before the call
    step: Callable[[str], None] = lambda name: None  # a node is about to run (progress)


Inputs = list[tuple[tuple[Any, ...], dict[str, Any]]]  # (args, kwargs) per batch


def fetch_attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def run_node(node: fx.Node, root: nn.Module, args: tuple, kwargs: dict) -> Any:
    """What ``node`` computes on ``args``, with ``root``'s modules."""
    if node.op == "call_module":
        return root.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        self_value, *rest = args
        return getattr(self_value, str(node.target))(*rest, **kwargs)
    raise ValueError(f"cannot run a {node.op} node")


def bind_placeholders(graph: fx.Graph, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Placeholder name -> value for a call ``root(*args, **kwargs)``; defaults where absent."""
    values: dict[str, Any] = {}
    positional = list(args)
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        name = str(node.target)
        if name.startswith("*"):
            raise ValueError(f"the traced forward takes {name}: not propagated")
        if positional:
            values[name] = positional.pop(0)
        elif name in kwargs:
            values[name] = kwargs[name]
        elif node.args:
            values[name] = node.args[0]  # the default fx recorded
        else:
            raise ValueError(f"no value for the traced input {name!r}")
    if positional:
        raise ValueError(f"{len(positional)} argument(s) more than the traced forward takes")
    return values


class Propagation:
    """One traced graph (module ``prefix``) run over every batch in both models."""

    def __init__(
        self,
        graph: fx.Graph,
        prefix: str,
        student: nn.Module,
        teacher: nn.Module,
        roles: Roles,
        store: Store,
    ) -> None:
        self.nodes = list(graph.nodes)
        self.graph = graph
        self.prefix = prefix
        self.student, self.teacher = student, teacher
        self.roles = roles
        self.store = store
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.role = {
            node: roles.role(f"{prefix}{node.target}") if node.op == "call_module" else None
            for node in self.nodes
        }
        self._needs()

    def _needs(self) -> None:
        """Which nodes each model must compute, and the positions of their users there."""
        fits = [n for n in self.nodes if self.role[n] == FIT]
        prepared = [n for n in self.nodes if self.role[n] == PREPARE]
        self.student_needed = _closure([a for n in fits + prepared for a in n.all_input_nodes])
        self.teacher_needed = _closure(fits)
        self.uses: dict[fx.Node, list[int]] = {}  # positions of the users, either model
        self.student_uses: dict[fx.Node, list[int]] = {}
        self.teacher_uses: dict[fx.Node, list[int]] = {}
        for node in self.nodes:
            reads = (
                (self.student_uses, node in self.student_needed or self.role[node] is not None),
                (self.teacher_uses, node in self.teacher_needed),
            )
            for uses, evaluated in reads:
                if evaluated:
                    for arg in node.all_input_nodes:
                        uses.setdefault(arg, []).append(self.index[node])
                        self.uses.setdefault(arg, []).append(self.index[node])
        for positions in self.uses.values():
            positions.sort()

    def next_use(self, node: fx.Node, after: int) -> int | None:
        """The first position after ``after`` where either model reads ``node``'s value."""
        uses = self.uses.get(node, [])
        position = bisect.bisect_right(uses, after)
        return uses[position] if position < len(uses) else None

    def run(self, student_inputs: Inputs, teacher_inputs: Inputs | None) -> None:
        """Propagate; ``teacher_inputs`` None: the teacher's inputs are the student's.

        The input lists are consumed (emptied once bound), so that the store alone holds them.
        """
        self._env: dict[str, dict[fx.Node, Values]] = {"s": {}, "t": {}}
        self._owners: dict[object, fx.Node] = {}
        self._batches = len(student_inputs)
        position = [0]

        def priority(owner: object) -> float:
            node = self._owners.get(owner)
            upcoming = None if node is None else self.next_use(node, position[0] - 1)
            return float("inf") if upcoming is None else float(upcoming)

        self.store.priority = priority
        try:
            for i, node in enumerate(self.nodes):
                position[0] = i
                if node.op == "output":
                    break
                if node.op != "placeholder":
                    student_inputs.clear()
                    if teacher_inputs is not None:
                        teacher_inputs.clear()
                self._step(node, student_inputs, teacher_inputs)
                self._release(i, node)
        finally:
            live = {id(v): v for e in self._env.values() for v in e.values()}
            for values in live.values():
                values.release()
            self._env = {"s": {}, "t": {}}

    def _values(self, node: fx.Node, constant: bool = False) -> Values:
        values = Values(self.store, object(), constant)
        self._owners[values.owner] = node
        return values

    def _step(self, node: fx.Node, student_inputs: Inputs, teacher_inputs: Inputs | None) -> None:
        role = self.role[node]
        in_student = node in self.student_needed
        in_teacher = node in self.teacher_needed
        if not (in_student or in_teacher or role is not None):
            return
        student, teacher = self._env["s"], self._env["t"]
        if node.op == "placeholder":
            student[node] = self._bound(node, student_inputs)
            teacher[node] = (
                student[node] if teacher_inputs is None else self._bound(node, teacher_inputs)
            )
            return
        if node.op == "get_attr":
            self._attribute(node)
            return
        name = f"{self.prefix}{node.target}"
        self.roles.step(name)
        inputs = node.all_input_nodes
        if role == PREPARE:
            self.roles.prepare(name, student.get(inputs[0]) if inputs else None)
        if role is None and all(student.get(a) is teacher.get(a) for a in inputs):
            student[node] = teacher[node] = self._compute(node, self.student, student)
            return
        if in_teacher or role == FIT:
            teacher[node] = self._compute(node, self.teacher, teacher)
        if role == FIT:
            outputs = self.roles.fit(name, student[inputs[0]], teacher[node])
            self._owners[outputs.owner] = node
            student[node] = outputs
        elif in_student:
            # Inputs the teacher shares are copied: the call may change them in place.
            shared = {a for a in inputs if student[a] is teacher.get(a)}
            student[node] = self._compute(node, self.student, student, shared)

    def _bound(self, node: fx.Node, inputs: Inputs) -> Values:
        values = self._values(node)
        for args, kwargs in inputs:
            values.append(bind_placeholders(self.graph, args, kwargs)[str(node.target)])
        return values

    def _attribute(self, node: fx.Node) -> None:
        student = fetch_attr(self.student, str(node.target))
        teacher = fetch_attr(self.teacher, str(node.target))
        values = self._values(node, constant=True)
        values.append(student)
        same = not isinstance(student, torch.Tensor) or (
            isinstance(teacher, torch.Tensor)
            and student.shape == teacher.shape
            and torch.equal(student, teacher)
        )
        self._env["s"][node] = values
        if same:
            self._env["t"][node] = values
        else:
            self._env["t"][node] = self._values(node, constant=True)
            self._env["t"][node].append(teacher)

    def _compute(
        self,
        node: fx.Node,
        root: nn.Module,
        env: dict[fx.Node, Values],
        copied: set[fx.Node] | None = None,
    ) -> Values:
        """``node`` over every batch in one model (once if no input varies by batch)."""
        per_batch = any(not env[a].constant for a in node.all_input_nodes)
        out = self._values(node, constant=not per_batch)
        copied = copied or set()

        def value(arg: fx.Node, batch: int) -> Any:
            item = env[arg][batch]
            return _cloned(item) if arg in copied else item

        for batch in range(self._batches if per_batch else 1):
            args = fx.node.map_arg(node.args, lambda a, b=batch: value(a, b))
            kwargs = fx.node.map_arg(node.kwargs, lambda a, b=batch: value(a, b))
            out.append(run_node(node, root, args, kwargs))  # type: ignore[arg-type]
            self.store.make_room()
        return out

    def _release(self, i: int, node: fx.Node) -> None:
        """Drop the values no later node reads (in that model); free those neither holds."""
        for arg in {*node.all_input_nodes, node}:
            for key, uses in (("s", self.student_uses), ("t", self.teacher_uses)):
                values = self._env[key].get(arg)
                if values is not None and not any(u > i for u in uses.get(arg, [])):
                    del self._env[key][arg]
                    if all(values is not v for e in self._env.values() for v in e.values()):
                        values.release()


def _closure(start: list[fx.Node]) -> set[fx.Node]:
    """``start`` and every node they depend on."""
    needed: set[fx.Node] = set()
    stack = list(start)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    return needed


def _cloned(value: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, value
    )


def outputs_match(expected: Any, got: Any) -> bool:
    """Whether a graph's output equals the module's own (tensor leaves, float tolerance)."""
    left, right = tree_leaves(expected), tree_leaves(got)
    if len(left) != len(right):
        return False
    for a, b in zip(left, right, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if isinstance(a, torch.Tensor) and (
            a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        ):
            return False
    return True


def _nbytes(value: Any) -> int:
    return sum(
        leaf.untyped_storage().nbytes()
        for leaf in tree_leaves(value)
        if isinstance(leaf, torch.Tensor)
    )


@torch.no_grad()
def probe(graph: fx.Graph, root: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, Any]:
    """Run ``graph`` once (values freed after their last user): each node's output bytes, by
    node name, and the graph's output (to check against ``root``'s own)."""
    nodes = list(graph.nodes)
    last = {node: i for i, n in enumerate(nodes) for node in n.all_input_nodes}
    env: dict[fx.Node, Any] = {}
    sizes: dict[str, int] = {}
    bound = bind_placeholders(graph, args, kwargs)
    for i, node in enumerate(nodes):
        if node.op == "output":
            return sizes, fx.node.map_arg(node.args[0], lambda a: env[a])
        if node.op == "placeholder":
            env[node] = bound[str(node.target)]
        elif node.op == "get_attr":
            env[node] = fetch_attr(root, str(node.target))
        else:
            node_args = fx.node.map_arg(node.args, lambda a: env[a])
            node_kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            env[node] = run_node(node, root, node_args, node_kwargs)  # type: ignore[arg-type]
        sizes[node.name] = _nbytes(env[node])
        for arg in node.all_input_nodes:
            if last[arg] == i:
                del env[arg]
    raise ValueError("the graph has no output")
