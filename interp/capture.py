"""See several layers' outputs in one forward pass, module or traced node alike.

:class:`LayerTaps` hands each requested layer's output to a callback the
moment it is computed, then cuts the forward short once the deepest one ran.

* Only module layers: a forward hook on each module (any model, traceable or
  not); the first call of a module counts.
* Any traced functional node among them (``"layer1.0.add"``,
  ``"inception3a.cat"``): the model's fx graph (:func:`interp._trace.trace`,
  traced in the mode the model is in, i.e. eval during mining) is run node by
  node by a :class:`torch.fx.Interpreter` that fetches every submodule and
  parameter from the user's model itself, so nothing is copied, wrapped or
  registered on it. The callback sees a node's value before any later
  in-place op (ResNet's ``relu(inplace=True)`` after the ``add``) changes it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import fx, nn

from ._utils import HookSet, StopForward
from ._trace import trace
from .layers import resolve_layer

__all__ = ["LayerTaps"]

Sink = Callable[[str, object], None]


class _Tapped(fx.Interpreter):
    """Runs a traced graph on the user's model, reporting the wanted nodes' values as they come."""

    def __init__(self, model: nn.Module, graph: fx.Graph, wanted: dict[fx.Node, list[str]], sink: Sink):
        super().__init__(model, garbage_collect_values=True, graph=graph)
        # Errors keep their own one-line message (no "While executing ..." appended).
        self.extra_traceback = False
        self.wanted, self.sink = wanted, sink
        self.left = len(wanted)

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        names = self.wanted.get(n)
        if names is not None:
            for name in names:  # one node may have two names: a block ("se") and its last op ("se.mul")
                self.sink(name, out)
            self.left -= 1
            if self.left == 0:  # nothing later is needed: skip the rest of the network
                raise StopForward
        return out


class LayerTaps:
    """Outputs of ``names`` (see :func:`interp.layers`) from single forward passes of ``model``.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module``; never modified (hooks, when used, are removed
        on leaving :meth:`attached`).
    names:
        Canonical layer names (:func:`interp.mine.resolve_layers`).

    Examples
    --------
    >>> taps = LayerTaps(model, ["layer1.0", "layer1.0.add"])      # doctest: +SKIP
    >>> with taps.attached(lambda name, out: print(name, out.shape)) as run:  # doctest: +SKIP
    ...     run(images)
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.names = list(names)
        self.refs = {n: resolve_layer(model, n) for n in self.names}
        # One traced node among them and the whole pass runs on the graph: one
        # forward serves every layer, in the order the graph computes them.
        self.graph = any(r.traced for r in self.refs.values())

    @contextmanager
    def attached(self, sink: Sink) -> Iterator[Callable[[torch.Tensor], None]]:
        """Yield ``run(x)``: one forward of ``x`` calling ``sink(name, output)`` once per layer.

        Enter it in the mode the pass runs in (eval): a traced graph is taken
        in that mode. ``run`` raises ``RuntimeError`` naming the layers the
        forward did not reach.
        """
        fired: set[str] = set()

        def report(name: str, output) -> None:
            if name in fired:
                return  # a later call of a shared module: the first call counts
            fired.add(name)
            sink(name, output)

        def check() -> None:
            missing = [n for n in self.names if n not in fired]
            if missing:
                raise RuntimeError(f"layer(s) {', '.join(missing)} did not run in the forward pass; "
                                   "pick layers that the model's forward uses")

        if self.graph:
            traced = trace(self.model)
            absent = [n for n in self.names if n not in traced.names]
            if absent:
                raise RuntimeError(f"layer(s) {', '.join(absent)} are not in the model's traced graph in eval mode; "
                                   "see `cnn-internals layers MODEL`")
            wanted: dict[fx.Node, list[str]] = {}
            for n in self.names:
                wanted.setdefault(traced.names[n], []).append(n)

            def run_graph(x: torch.Tensor) -> None:
                fired.clear()
                try:
                    _Tapped(self.model, traced.graph, wanted, report).run(x)
                except StopForward:
                    pass
                check()

            yield run_graph
            return

        def hook_for(name: str):
            def hook(module, inputs, output):
                if name not in fired:
                    report(name, output)
                    if len(fired) == len(self.names):
                        raise StopForward  # every layer seen: skip the rest of the forward
            return hook

        with HookSet() as hooks:
            for n, ref in self.refs.items():
                hooks.forward(ref.module, hook_for(n))

            def run_hooks(x: torch.Tensor) -> None:
                fired.clear()
                try:
                    self.model(x)
                except StopForward:
                    pass
                check()

            yield run_hooks
