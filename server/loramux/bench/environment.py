"""The bench's environment: the model directory, the adapter stores, the servers and the baselines."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from loramux.bench.baselines import Baselines
from loramux.bench.options import BenchOptions
from loramux.bench.synthetic import PRESETS, AdapterSpec, ModelShape, write_adapter, write_synthetic_model
from loramux.bench.target import LoramuxTarget, ServerSettings

log = logging.getLogger("loramux.bench")


class Environment:
    """Set up with `start()`, torn down with `stop()`; suites use its servers, baselines and adapter groups."""

    def __init__(self, opts: BenchOptions, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        preset_device, preset_dtype = ("auto", "auto") if opts.model else PRESETS[opts.preset][1:]
        self.device = opts.device or preset_device
        self.dtype = opts.dtype or preset_dtype
        self.model_dir: Path | None = None
        self.shape: ModelShape | None = None
        self.groups: dict[str, list[str]] = {}  # group name -> adapter ids, in popularity order
        self.adapter_dirs: dict[str, Path] = {}
        self.server: LoramuxTarget | None = None  # unmerged: base, mixed, kinds, scale
        self.merged: LoramuxTarget | None = None  # with a merged cache: suite hot
        self.merged_note: str | None = None
        self.baselines: Baselines | None = None
        self.setup_s: dict[str, float] = {}
        self.extra: list[LoramuxTarget] = []  # servers the KV suites start with their own flags
        self.eager: LoramuxTarget | None = None  # a --no-compile copy of `server` (suite sampling)
        self._long_model: Path | None = None

    @property
    def vocab(self) -> tuple[int, int]:
        # Ids 0..2 are pad/bos/eos in the byte vocabulary; other tokenizers are sampled the same way.
        return (3, self.shape.vocab_size)

    def start(self) -> None:
        o = self.opts
        t = time.perf_counter()
        if o.model:
            self.model_dir = Path(o.model)
        else:
            self.model_dir = write_synthetic_model(o.preset, self.workdir / "model", seed=o.seed)
        self.shape = ModelShape.of(self.model_dir)
        self.setup_s["model"] = time.perf_counter() - t
        t = time.perf_counter()
        store = self.workdir / "store"
        self._write_groups(store)
        self.setup_s["adapters"] = time.perf_counter() - t
        merged_store = self.workdir / "store-merged"
        if "hot" in o.suites:  # copied before any server scans (and writes manifests into) the first store
            for adapter_id in self.groups["mix"]:
                shutil.copytree(self.adapter_dirs[adapter_id], merged_store / adapter_id, dirs_exist_ok=True)
        t = time.perf_counter()
        self.server = self._target("loramux", store, o.server, merged_cache_mb=0.0)
        if "hot" in o.suites:
            self.merged = self._target("loramux-merged", merged_store, o.merged_server, o.merged_cache_mb)
            if o.server and not o.merged_server:
                self.merged = None
                self.merged_note = "a running server was given (--server) without --merged-server"
        self.setup_s["servers"] = time.perf_counter() - t
        if self.merged is not None:
            hot = self.groups["mix"][0]
            # Ask for the merge explicitly where the server has the API; otherwise its hot policy decides.
            self.merged_note = self.merged.load_adapter(hot, merge=True, pin=True)
        if "mixed" in o.suites or "sampling" in o.suites:
            lora = {a: self.adapter_dirs[a] for a in self.groups["mix"]}
            self.baselines = Baselines(self.model_dir, self.device, self.dtype, peft_adapters=lora)

    def eager_server(self) -> LoramuxTarget | None:
        """A copy of the main server with --no-compile (its own store copy), started once; None with --server."""
        if self.opts.server:
            return None
        if self.eager is None:
            store = self.workdir / "store-eager"
            for adapter_id in self.groups["mix"]:
                shutil.copytree(self.adapter_dirs[adapter_id], store / adapter_id, dirs_exist_ok=True)
            self.eager = self._target("loramux-eager", store, None, 0.0, compile=False)
        return self.eager

    def stop(self) -> None:
        for target in (self.server, self.merged, self.eager, *self.extra):
            if target is not None:
                try:
                    target.stop()
                except Exception:  # tearing down must not hide the results
                    log.exception("stopping %s", target.name)

    # --- the KV suites' servers ---
    def kv_bytes_per_token(self) -> int:
        """K and V of one position in every layer, in the servers' dtype."""
        import torch
        from transformers import AutoConfig

        from loramux.engine.kv_budget import kv_bytes_per_token

        dtype = self.dtype if self.dtype != "auto" else ("float32" if self.device == "cpu" else "bfloat16")
        return kv_bytes_per_token(AutoConfig.from_pretrained(self.model_dir), getattr(torch, dtype))

    def kv_store(self, adapter_ids: list[str]) -> Path:
        """A store of its own for one server, holding copies of `adapter_ids`."""
        store = self.workdir / f"store-kv-{len(self.extra)}"
        store.mkdir(parents=True, exist_ok=True)
        for adapter_id in adapter_ids:
            shutil.copytree(self.adapter_dirs[adapter_id], store / adapter_id, dirs_exist_ok=True)
        return store

    def extra_target(self, name: str, store: Path, **engine: object) -> LoramuxTarget:
        """A server on the long-context copy of the model, with these EngineConfig fields as flags."""
        if self.opts.server:
            raise RuntimeError("the KV suites start servers with their own flags (not with --server)")
        settings = ServerSettings(
            model=str(self._long_context_model()),
            store=store,
            device=self.device,
            dtype=self.dtype,
            max_device_adapters=self.opts.device_slots,
            threads=self.opts.threads,
            engine={"compile": self.opts.compile, **engine},
        )
        target = LoramuxTarget(name, settings, spawn=self.opts.spawn, log_path=self.workdir / f"{name}.log")
        self.extra.append(target)
        target.start()
        return target

    def _long_context_model(self) -> Path:
        """The model with a context of at least 4096 positions (its weights linked, its config edited)."""
        import json

        if self._long_model is None:
            d = self.workdir / "model-long"
            d.mkdir(parents=True, exist_ok=True)
            for f in self.model_dir.iterdir():
                if f.is_file() and f.name != "config.json" and not (d / f.name).exists():
                    (d / f.name).symlink_to(f.resolve())
            cfg = json.loads((self.model_dir / "config.json").read_text())
            cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings") or 0), 4096)
            (d / "config.json").write_text(json.dumps(cfg, indent=1))
            self._long_model = d
        return self._long_model

    # --- helpers ---
    def _write_groups(self, store: Path) -> None:
        o = self.opts
        groups: dict[str, tuple[int, AdapterSpec]] = {
            "mix": (o.adapters, AdapterSpec("mix", "lora", o.rank, o.targets)),
        }
        if "kinds" in o.suites:
            n = o.kinds_per_group
            groups["bottleneck"] = (n, AdapterSpec("bn", "bottleneck", o.bottleneck_width))
            groups["soft_prompt"] = (n, AdapterSpec("soft", "soft_prompt", o.soft_prompt_tokens))
            groups["dora"] = (n, AdapterSpec("dora", "dora", o.rank, o.targets))
            groups["ia3"] = (n, AdapterSpec("ia3", "ia3", 1, ("k_proj", "v_proj", "down_proj")))
        if "scale" in o.suites:
            groups["scale"] = (o.scale_adapters, AdapterSpec("s", "lora", o.scale_rank, o.scale_targets))
        seed = o.seed * 1_000_000
        for group, (count, proto) in groups.items():
            width = max(2, len(str(count - 1)))
            ids = []
            for i in range(count):
                seed += 1
                spec = AdapterSpec(f"{proto.adapter_id}-{i:0{width}d}", proto.kind, proto.rank, proto.targets, seed)
                self.adapter_dirs[spec.adapter_id] = write_adapter(spec, self.shape, store)
                ids.append(spec.adapter_id)
            self.groups[group] = ids
        log.info(
            "wrote %d adapters (%s)",
            len(self.adapter_dirs),
            ", ".join(f"{g}: {len(v)}" for g, v in self.groups.items()),
        )

    def _target(
        self, name: str, store: Path, address: str | None, merged_cache_mb: float, compile: bool | None = None
    ) -> LoramuxTarget:
        o = self.opts
        if address:
            target = LoramuxTarget(
                name, spawn="external", address=address, metrics_url=o.metrics_url if name == "loramux" else None
            )
            for adapter_id in sorted(p.name for p in store.iterdir() if p.is_dir()):
                target.upload(store / adapter_id, adapter_id)
            return target
        settings = ServerSettings(
            model=str(self.model_dir),
            store=store,
            device=self.device,
            dtype=self.dtype,
            max_device_adapters=o.device_slots,
            merged_cache_mb=merged_cache_mb,
            threads=o.threads,
            engine={"compile": o.compile if compile is None else compile},
        )
        target = LoramuxTarget(name, settings, spawn=o.spawn, log_path=self.workdir / f"{name}.log")
        target.start()
        return target
