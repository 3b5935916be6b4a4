"""anchor: keep fine-tuned chat models in their Assistant persona, in their weights and at run time.

Public names are imported on first use (PEP 562), so ``import anchor`` and ``anchor --help`` stay fast and only
the parts you touch pull in transformers or TRL.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AssistantAxis": "anchor.axis", "AxisMismatchError": "anchor.axis", "compute_axis": "anchor.axis",
    "AnchorCallback": "anchor.callback", "AnchorConfig": "anchor.callback",
    "Cap": "anchor.capping", "attach_cap": "anchor.capping", "attach_steer": "anchor.capping",
    "cap": "anchor.capping", "steer": "anchor.capping",
    "decoder_layers": "anchor.models", "load_model": "anchor.models",
    "DriftTrace": "anchor.monitor", "monitor": "anchor.monitor", "monitor_many": "anchor.monitor",
    "ScreenReport": "anchor.screening", "screen": "anchor.screening",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'anchor' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
