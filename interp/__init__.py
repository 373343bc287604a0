"""cnn-internals engine: look inside any ``torch.nn.Module`` CNN.

Public API
----------
layers(model)                      -> list of addressable layer names
receptive_field(model, layer, ...) -> ReceptiveField (by torch.fx tracing)
project(model, images, layer, units, method="guided")
                                   -> pixel-space projections (deconvnet /
                                      guided backprop / gradient)

The engine knows nothing about specific models; see :mod:`adapters` for those.
"""
from .layers import conv_layers, layers, resolve_layer
from .rf import ReceptiveField, receptive_field, receptive_fields
from .project import project

__all__ = [
    "layers",
    "conv_layers",
    "resolve_layer",
    "receptive_field",
    "receptive_fields",
    "ReceptiveField",
    "project",
]
__version__ = "0.1.0"

# Top-k mining, panels and the visualize pipeline (issue 4). ``mine`` and
# ``visualize`` are the public wrappers (progress, workers, torchrun) of the
# one-process cores interp.mine.mine_local and interp.draw.visualize.visualize_local.
from .topk import TopK
from .draw.panels import panel, panel_tiles
from .api import mine, visualize

__all__ += ["mine", "TopK", "panel", "panel_tiles", "visualize"]
