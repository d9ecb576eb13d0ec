"""What every part of adapters/ shares without importing torch: the contract's adapter types, the error.

The store (which imports no torch) validates uploads with these; kinds/base.py re-exports them.
"""

from __future__ import annotations

# Adapter.adapter_type values of the API contract (plus the soft-prompt kinds).
ADAPTER_TYPES = ("lora", "dora", "ia3", "bottleneck", "prompt", "prefix")


class AdapterError(ValueError):
    """An adapter that cannot be served as it is: bad config, bad weights, no match.

    The message says what was wrong; the API maps it to INVALID_ARGUMENT.
    """
