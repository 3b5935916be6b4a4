"""anchor: keep fine-tuned chat models in their Assistant persona, in their weights and at run time."""

__version__ = "0.1.0"

from anchor.axis import AssistantAxis, AxisMismatchError, compute_axis
from anchor.models import decoder_layers, load_model

__all__ = ["AssistantAxis", "AxisMismatchError", "__version__", "compute_axis", "decoder_layers", "load_model"]
