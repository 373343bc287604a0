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
from .layers import layers
from .rf import ReceptiveField, receptive_field
from .project import project

__all__ = ["layers", "receptive_field", "ReceptiveField", "project"]
__version__ = "0.1.0"
