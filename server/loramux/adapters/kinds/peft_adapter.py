"""A parsed PEFT adapter (LoRA / DoRA / IA3): per-module tensors, ready for a device slot."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from loramux.adapters.kinds.base import AdapterError, AdapterInfo, LoadedAdapter


@dataclass
class ModuleWeights:
    """One base module's share of the adapter, in the form MultiAdapterLinear installs."""

    a: torch.Tensor | None = None  # [r, in]
    b: torch.Tensor | None = None  # [out, r], scale s folded in
    lora_bias: torch.Tensor | None = None  # [out], scale s folded in
    dora_g: torch.Tensor | None = None  # [out]: m / ‖W0 + s·B·A‖_row
    ia3: torch.Tensor | None = None  # [in] if ia3_feedforward else [out]
    ia3_feedforward: bool = False
    bias_delta: torch.Tensor | None = None  # [out]: replaced base bias minus the base's own

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: t for f in fields(self) if isinstance(t := getattr(self, f.name), torch.Tensor)}

    def is_empty(self) -> bool:
        return not self.tensors()

    def map(self, fn) -> ModuleWeights:
        return replace(self, **{k: fn(t) for k, t in self.tensors().items()})

    def cast(self, dtype: torch.dtype, name: str) -> ModuleWeights:
        """To `dtype` on the CPU; refuses NaN / inf (also those that appear by overflow in the cast)."""
        out = self.map(lambda t: t.detach().to(device="cpu", dtype=dtype).contiguous())
        for kind, t in out.tensors().items():
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(f"{name}: {kind} holds NaN or infinite values (in {dtype})")
        return out


class PeftAdapter(LoadedAdapter):
    def __init__(self, info: AdapterInfo, modules: dict[str, ModuleWeights]) -> None:
        self.info = info
        # original base module name (as in WrappedModel.linears) -> its weights
        self.modules = modules

    def nbytes(self) -> int:
        return sum(t.nbytes for mw in self.modules.values() for t in mw.tensors().values())

    @property
    def device(self) -> torch.device:
        for mw in self.modules.values():
            for t in mw.tensors().values():
                return t.device
        return torch.device("cpu")

    def to_device(self, device: torch.device) -> PeftAdapter:
        if self.device == torch.device(device):
            return self
        moved = {n: mw.map(lambda t: t.to(device, non_blocking=True)) for n, mw in self.modules.items()}
        return PeftAdapter(self.info, moved)

    def install(self, wrapped, slot: int) -> None:  # wrapped: WrappedModel
        missing = [n for n in self.modules if n not in wrapped.linears]
        if missing:
            raise AdapterError(f"the model has no wrapped modules {missing}; was this adapter parsed for it?")
        try:
            for name, mw in self.modules.items():
                layer = wrapped.linears[name]
                layer.clear(slot)
                if mw.bias_delta is not None:
                    layer.set_bias_delta(slot, mw.bias_delta)
                if mw.a is not None and mw.b is not None:
                    layer.set_lora(slot, mw.a, mw.b, lora_bias=mw.lora_bias, dora_g=mw.dora_g)
                if mw.ia3 is not None:
                    layer.set_ia3(slot, mw.ia3, mw.ia3_feedforward)
        except Exception:
            self.uninstall(wrapped, slot)  # never leave a half-installed slot
            raise

    def uninstall(self, wrapped, slot: int) -> None:
        for name in self.modules:
            layer = wrapped.linears.get(name)
            if layer is not None:
                layer.clear(slot)
