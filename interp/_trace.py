"""Symbolic tracing with readable node names.

torch.fx names functional nodes ``add``, ``add_1``, ... which says nothing about
where they are. Like torchvision's ``feature_extraction`` we record the module
path that was active when each node was created and name a node
``<module path>.<op>`` (``layer1.0.add``, ``inception3a.cat``). A module
called more than once (a shared ``relu``) gets ``<path>_1``, ``<path>_2`` for
its later calls; its plain path always means the first call.
"""
from __future__ import annotations

import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

# Node targets that never produce a feature map: not offered as layers.
_NON_TENSOR_FUNCS = {getattr, len, isinstance}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "item", "tolist", "__len__", "get_device", "nelement"}


class _PathTracer(fx.Tracer):
    """fx tracer that tags each node with the module path it was created in."""

    def __init__(self, leaf_types: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self._stack: list[str] = [""]
        self.module_outputs: dict[str, fx.Node] = {}
        self.module_calls: dict[str, int] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        self._stack.append(path)
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._stack.pop()
        calls = self.module_calls.get(path, 0)
        self.module_calls[path] = calls + 1
        if isinstance(out, fx.Proxy):
            key = path if calls == 0 else f"{path}_{calls}"
            self.module_outputs.setdefault(key, out.node)
        return out

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest, **kw)
        proxy.node.meta["module_path"] = self._stack[-1]
        return proxy


@dataclass
class Traced:
    """Result of tracing one model: its graph and the public names of nodes."""

    graph: fx.Graph
    # A weak reference: this object lives in a WeakKeyDictionary keyed by the
    # model, and a strong reference back to the key would keep every model
    # ever traced alive.
    _root: "weakref.ref[nn.Module]"
    names: dict[str, fx.Node] = field(default_factory=dict)  # public name -> node
    functional: list[str] = field(default_factory=list)  # names of functional nodes, in order
    module_order: list[str] = field(default_factory=list)  # leaf module paths in call order
    _truncated: dict[str, fx.GraphModule] = field(default_factory=dict, repr=False)

    @property
    def root(self) -> nn.Module:
        root = self._root()
        if root is None:  # pragma: no cover - the cache entry dies with the model
            raise RuntimeError("the traced model no longer exists")
        return root

    def node_name(self, node: fx.Node) -> str | None:
        for name, n in self.names.items():
            if n is node:
                return name
        return None

    def truncated(self, name: str) -> fx.GraphModule:
        """A GraphModule that returns the output of node ``name`` and stops there.

        Submodules and parameters are shared with the traced model (not
        copied), so the truncated module computes with the user's weights.
        """
        if name in self._truncated:
            return self._truncated[name]
        target = self.names[name]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in self.graph.nodes:
            if node.op == "output":
                continue
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node is target:
                break
        graph.output(env[target])
        gm = fx.GraphModule(self.root, graph)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        self._truncated[name] = gm
        return gm


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    name = getattr(target, "__name__", str(target))
    return re.sub(r"^_+|_+$", "", name) or "op"


def _is_tensor_op(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target not in _NON_TENSOR_FUNCS
    if node.op == "call_method":
        return node.target not in _NON_TENSOR_METHODS
    return False


def _fingerprint(model: nn.Module) -> tuple:
    # Cheap identity of the module tree: a swapped submodule or a toggled
    # training flag invalidates the cached trace.
    return tuple((name, id(m), m.training) for name, m in model.named_modules())


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Traced | Exception]]" = weakref.WeakKeyDictionary()


_LEAF_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Traced | Exception]]" = weakref.WeakKeyDictionary()


def trace(model: nn.Module, leaf_types: tuple[type, ...] = ()) -> Traced:
    """Trace ``model`` with torch.fx (cached). Raises the tracer's error if it fails.

    ``leaf_types``: modules of these types (subclasses included) are not traced
    through but kept as calls. The receptive-field analysis uses this for
    convolutions and pools whose forward computes its padding from the input
    size (timm ``Conv2dSame``), which plain fx cannot trace; such traces are
    cached apart from the plain one.
    """
    cache = _LEAF_CACHE if leaf_types else _CACHE
    key = _fingerprint(model) + (leaf_types,)
    hit = cache.get(model)
    if hit is not None and hit[0] == key:
        if isinstance(hit[1], Exception):
            raise hit[1]
        return hit[1]
    tracer = _PathTracer(leaf_types)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(model)
    except Exception as exc:  # fx cannot trace data-dependent control flow etc.
        # Cache a fresh exception without the traceback: its frames would
        # hold the model and keep it (and this cache entry) alive forever.
        cache[model] = (key, type(exc)(*exc.args) if _rebuildable(exc) else RuntimeError(str(exc)))
        raise
    traced = Traced(graph=graph, _root=weakref.ref(model))
    counts: dict[str, int] = {}
    module_names = {name for name, _ in model.named_modules()}
    for name, node in tracer.module_outputs.items():
        traced.names[name] = node
    for node in graph.nodes:
        if node.op == "call_module":
            traced.module_order.append(str(node.target))
        if not _is_tensor_op(node):
            continue
        prefix = node.meta.get("module_path", "")
        base = f"{prefix}.{_op_name(node)}" if prefix else _op_name(node)
        n = counts.get(base, 0)
        counts[base] = n + 1
        name = base if n == 0 else f"{base}_{n}"
        while name in module_names or name in traced.names:
            n += 1
            name = f"{base}_{n}"
        traced.names[name] = node
        traced.functional.append(name)
    cache[model] = (key, traced)
    return traced


def _rebuildable(exc: Exception) -> bool:
    try:
        type(exc)(*exc.args)
        return True
    except Exception:  # noqa: BLE001 - exotic constructors
        return False


def try_trace(model: nn.Module, leaf_types: tuple[type, ...] = ()) -> tuple[Traced | None, str | None]:
    """Like :func:`trace` but returns ``(None, reason)`` when tracing fails."""
    try:
        return trace(model, leaf_types), None
    except Exception as exc:  # noqa: BLE001 - any tracer failure means "not traceable"
        return None, f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
