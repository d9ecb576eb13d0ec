"""A wrapped layer as one opaque operator: how a compiled decode step serves rows of many adapters.

A compiled graph (engine/compiled.py) specialises on every Python value the forward reads.
The adapter arithmetic of a step reads a lot of them: the segments (which rows use which
slot, different every step), the slots' kinds, the LoRA stacks' layout and plans, the
merged slot and which layers it merged. Traced, each would be a guard, and almost every
step would need a graph of its own.

So in a compiled adapter step a wrapped layer traces only its product with one weight, and
adds the rows' deltas with one opaque call: `y = x · W` (W: the layer's weight for this step,
taken from the forward's context by layer index, its merged copy or W0), then
`loramux::adapter_delta(x, y, handle)`, a custom operator that dynamo and inductor treat as a
black box that adds into y in place. `handle` is a reference-typed opaque object (torch's
opaque objects for custom operators) pointing at the layer; the operator's body adds what the
layer's eager forward adds on top of that product (`MultiAdapterLinear.delta_into`), on the
forward's context read from the layer's holder: batched LoRA for plain slots on the plans the
runner prepared, the per-segment reference for DoRA / IA3 / shifted slots, the undoing of a
merged delta for the other rows. Exactly what an eager forward computes, so the graph around
the deltas (the base products, norms, attention, activations, the head) is the same for every
mix of adapters: two graphs (B = 1 and B >= 2) serve every adapter decode step. The base
products being traced, the one-row graph's are inductor's fused matrix-vector products, as in
the base graph (engine/compiled.py, `inductor_options`).

Bottleneck adapters (model/blocks.py) sit behind forward hooks on each decoder layer's norm
and sublayer. In these steps the norm's hook only keeps its input, and the sublayer's hook
is one `loramux::bottleneck_point(s, x, handle)` call (returning a new tensor) whose body
applies whatever units the rows' slots hold at that point (`InsertionPoint.eager_apply`), so
a resident bottleneck adapter changes nothing the graph reads either; while one is resident,
base-only and all-merged steps take this graph too (their own graphs read the hooks' state).

Its cost is one operator call per wrapped layer and per insertion point: about 20 µs of
dispatch each on this 2-core CPU beside its body, plus the graph splits the calls force
(`scripts/profile_step.py --threads 1 --adapters 16 --compile`, 16 LoRA r16 on q, k, v, o: a
one-row adapter step 1.3-1.4x the compiled base step, 1.12x at 64 rows; 2.2x at one row while
the operator computed the base product too, eagerly, so unfused), which is why base-only and
all-merged steps keep graphs of their own without them.
`available()` is False on a torch without opaque objects: adapter steps then run eager.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from loramux.adapters.model.blocks import InsertionPoint
    from loramux.adapters.model.linear import MultiAdapterLinear

log = logging.getLogger("loramux.compiled")

try:
    from torch._library.opaque_object import get_opaque_type_name, register_opaque_type
    from torch._opaque_base import OpaqueBase
except ImportError:  # a torch without opaque objects for custom operators
    OpaqueBase, register_opaque_type = object, None  # type: ignore[assignment, misc]


class LayerHandle(OpaqueBase):  # type: ignore[misc, valid-type]
    """What an operator is given instead of its wrapped layer or insertion point: a weak reference to
    it (no reference cycle between the module side and its handle)."""

    def __init__(self, target: MultiAdapterLinear | InsertionPoint) -> None:
        self._target = weakref.ref(target)

    def target(self) -> Any:
        target = self._target()
        if target is None:
            raise RuntimeError("loramux operator: the layer of this handle is gone")
        return target


def _delta(x: torch.Tensor, y: torch.Tensor, handle: LayerHandle) -> None:
    """Add each row's adapter delta into y = x · W [tokens, out] in place, under the forward's context
    (W: the weight the step put in the context for this layer, its merged copy or W0). x: [tokens, in]."""
    layer = handle.target()
    layer.delta_into(x, y, layer.holder.get())


def _bottleneck(s: torch.Tensor, x: torch.Tensor, handle: LayerHandle) -> torch.Tensor:
    """A bottleneck insertion point's output: the sublayer's s [tokens, hidden] with each row's unit
    applied (x [tokens, hidden]: the residual entering the sublayer's norm), as a new tensor."""
    return handle.target().eager_apply(s, x)


def _define() -> Any | None:
    """Register the handle type and both operators; None (and a warning) where this torch cannot."""
    if register_opaque_type is None:
        return None
    try:
        register_opaque_type(LayerHandle, typ="reference")
        handle = get_opaque_type_name(LayerHandle)
        # torch.library's low-level definition, not the custom_op decorator: the decorator wraps every
        # call in an autograd layer this inference-only operator does not need (~2x the call's cost)
        lib = torch.library.Library("loramux", "DEF")
        lib.define(f"adapter_delta(Tensor x, Tensor(a!) y, {handle} handle) -> ()")
        lib.impl("adapter_delta", _delta, "CompositeExplicitAutograd")
        torch.library.register_fake("loramux::adapter_delta", lambda x, y, handle: None, lib=lib)
        lib.define(f"bottleneck_point(Tensor s, Tensor x, {handle} handle) -> Tensor")
        lib.impl("bottleneck_point", _bottleneck, "CompositeExplicitAutograd")
        torch.library.register_fake("loramux::bottleneck_point", lambda s, x, handle: torch.empty_like(s), lib=lib)
    except Exception as e:  # an opaque-object API that differs from torch 2.13's: adapter steps run eager
        log.warning("adapter operators unavailable (%s: %s); adapter decode steps run eager", type(e).__name__, e)
        return None
    return lib


_LIB = _define()  # kept alive: the operators live as long as their library object
if _LIB is not None:
    adapter_delta = torch.ops.loramux.adapter_delta
    bottleneck_point = torch.ops.loramux.bottleneck_point
else:
    adapter_delta, bottleneck_point = _delta, _bottleneck


def available() -> bool:
    """Whether adapter steps can be compiled with this torch (its opaque objects for custom operators work)."""
    return _LIB is not None
