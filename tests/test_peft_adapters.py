"""PEFT is the oracle: loramux's LoRA / DoRA / IA3 logits and greedy tokens equal PeftModel's, mixed batches too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig
from peft_helpers import greedy, make_peft_adapter, mixed_logits, reference_logits, wrapped_greedy
from safetensors.torch import load_file, save_file

from loramux.adapters.formats.loader import load_adapter_dir, parse_adapter
from loramux.adapters.kinds.base import AdapterError
from loramux.adapters.model.wrapped import WrappedModel
from loramux.engine.forward_context import BASE_SLOT, AdapterContext
from loramux.model import build_from_config, tiny_gpt2_config, tiny_llama_config

ATOL = 1e-4  # float32; a wrong delta is off by >1e-2
ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (architecture, PEFT config factory, perturb the base biases the adapter saves, expected adapter_type)
CASES = {
    "llama_lora_qv": (
        "llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), False, "lora"
    ),
    "llama_rslora_all_linear": (
        "llama", lambda: LoraConfig(
            r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", exclude_modules=["down_proj"]
        ), False, "lora"
    ),
    "llama_patterns_layers": (
        "llama",
        lambda: LoraConfig(
            r=4, lora_alpha=8, target_modules=ALL_LLAMA, layers_to_transform=[1], layers_pattern="layers",
            rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"o_proj": 3, "gate_proj": 32},
        ),
        False,
        "lora",
    ),
    "llama_regex": (
        "llama",
        lambda: LoraConfig(r=4, lora_alpha=4, target_modules=r"model\.layers\.0\.self_attn\.(q|k)_proj|.*mlp\.up_proj"),
        False,
        "lora",
    ),
    "llama_dora": (
        "llama", lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
        False, "dora",
    ),
    "llama_ia3": (
        "llama", lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        False, "ia3",
    ),
    "gpt2_lora_conv1d": (
        "gpt2", lambda: LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
        False, "lora",
    ),
    "gpt2_lora_bias": (
        "gpt2", lambda: LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, lora_bias=True, target_modules=["c_attn"]),
        False, "lora",
    ),
    "gpt2_bias_lora_only": (
        "gpt2", lambda: LoraConfig(r=2, lora_alpha=4, fan_in_fan_out=True, bias="lora_only", target_modules=["c_fc"]),
        True, "lora",
    ),
    "gpt2_dora_bias_all": (
        "gpt2",
        lambda: LoraConfig(
            r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True, bias="all", target_modules=["c_attn"]
        ),
        True,
        "dora",
    ),
    "gpt2_ia3": (
        "gpt2", lambda: IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], fan_in_fan_out=True),
        False, "ia3",
    ),
}  # fmt: skip
CONFIGS = {"llama": tiny_llama_config, "gpt2": tiny_gpt2_config}


class Setup:
    """One wrapped base model per architecture with every case of that architecture installed in its own slot."""

    def __init__(self, arch: str, root: Path) -> None:
        self.wrapped = WrappedModel(build_from_config(CONFIGS[arch](), seed=0), num_slots=8)
        self.base = build_from_config(CONFIGS[arch](), seed=0)
        self.peft: dict[str, torch.nn.Module] = {}
        self.slot: dict[str, int] = {}
        self.loaded = {}
        self.root = root
        for i, name in enumerate(n for n, c in CASES.items() if c[0] == arch):
            _, make_config, perturb, _ = CASES[name]
            self.peft[name] = make_peft_adapter(
                CONFIGS[arch](), make_config(), root / name, seed=100 + i, perturb_biases=perturb
            )
            self.loaded[name] = load_adapter_dir(root / name, self.wrapped)
            self.loaded[name].install(self.wrapped, i)
            self.slot[name] = i


@pytest.fixture(scope="module")
def setups(tmp_path_factory) -> dict[str, Setup]:
    root = tmp_path_factory.mktemp("peft")
    return {arch: Setup(arch, root / arch) for arch in CONFIGS}


def _prompt(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_single_adapter_matches_peft(setups, case):
    arch, _, _, kind = CASES[case]
    s = setups[arch]
    adapter = s.loaded[case]
    assert adapter.info.adapter_type == kind
    prompt = _prompt(1, 11)
    ours = mixed_logits(s.wrapped, [prompt], [s.slot[case]])[0]
    ref = reference_logits(s.peft[case], prompt)
    base = reference_logits(s.base, prompt)
    assert (ref - base).abs().max() > 1e-2, "the adapter must change the output, or the test proves nothing"
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4)
    ref_tokens = greedy(lambda ids: reference_logits(s.peft[case], ids), prompt, 8)
    assert wrapped_greedy(s.wrapped, s.slot[case], prompt, 8) == ref_tokens


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_mixed_batch_full_model_matches_peft(setups, arch):
    """Every adapter of the architecture plus base rows in one flat forward, rows grouped by slot."""
    s = setups[arch]
    names = list(s.slot)
    seqs, slots, refs = [], [], []
    for i, name in enumerate(names):
        for j in range(2 if i % 2 == 0 else 1):  # some adapters with two sequences, of different lengths
            seqs.append(_prompt(10 * i + j, 4 + 3 * j + i % 3))
            slots.append(s.slot[name])
            refs.append(s.peft[name])
    seqs.insert(2, _prompt(99, 6))  # base rows between two adapter segments
    slots.insert(2, BASE_SLOT)
    refs.insert(2, s.base)
    seqs.append(_prompt(98, 1))  # and at the end
    slots.append(BASE_SLOT)
    refs.append(s.base)
    for ours, seq, ref_model in zip(mixed_logits(s.wrapped, seqs, slots), seqs, refs):
        torch.testing.assert_close(ours, reference_logits(ref_model, seq), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_mixed_rows_layer_level_match_peft_layers(setups, arch):
    """Each wrapped linear on a flat mixed batch equals each PEFT layer on its own rows."""
    s = setups[arch]
    row_slots, owners = [], []
    for name in s.slot:
        row_slots += [s.slot[name]] * 5
        owners.append((name, 5))
    row_slots = [BASE_SLOT] * 3 + row_slots + [BASE_SLOT] * 2
    owners = [(None, 3)] + owners + [(None, 2)]
    s.wrapped.holder.set(AdapterContext.from_row_slots(row_slots, torch.device("cpu")))
    try:
        for module_name, layer in s.wrapped.linears.items():
            x = torch.randn(1, len(row_slots), layer.in_features, generator=torch.Generator().manual_seed(7))
            with torch.no_grad():
                ours = layer(x)[0]
            start = 0
            for owner, n in owners:
                model = s.base if owner is None else s.peft[owner].base_model.model
                with torch.no_grad():
                    ref = model.get_submodule(module_name)(x[:, start : start + n])[0]
                torch.testing.assert_close(ours[start : start + n], ref, atol=ATOL, rtol=1e-4)
                start += n
    finally:
        s.wrapped.holder.set(None)


def test_info_bytes_and_uninstall(setups):
    s = setups["llama"]
    a = s.loaded["llama_patterns_layers"]
    assert a.info.rank == 6
    assert a.info.mergeable
    assert all(".layers.1." in n for n in a.info.target_modules)
    assert a.nbytes() > 0 and a.to_device(torch.device("cpu")) is a
    assert s.loaded["llama_lora_qv"].info.target_modules == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    prompt = _prompt(5, 7)
    spare = 7
    a.install(s.wrapped, spare)
    torch.testing.assert_close(
        mixed_logits(s.wrapped, [prompt], [spare])[0], reference_logits(s.peft["llama_patterns_layers"], prompt)
    )
    a.uninstall(s.wrapped, spare)
    torch.testing.assert_close(mixed_logits(s.wrapped, [prompt], [spare])[0], reference_logits(s.base, prompt))


def test_ia3_without_feedforward_modules_uses_the_saved_shapes(setups):
    s = setups["llama"]
    cfg = json.loads((s.root / "llama_ia3" / "adapter_config.json").read_text())
    cfg["feedforward_modules"] = None
    adapter = parse_adapter(cfg, s.root / "llama_ia3" / "adapter_model.safetensors", s.wrapped)
    assert adapter.modules["model.layers.0.mlp.down_proj"].ia3_feedforward
    assert not adapter.modules["model.layers.0.self_attn.k_proj"].ia3_feedforward


def test_all_linear_honours_exclude_modules(setups):
    targets = setups["llama"].loaded["llama_rslora_all_linear"].info.target_modules
    assert len(targets) == 12 and not any(t.endswith("down_proj") for t in targets)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"peft_type": "MULTITASK_PROMPT_TUNING", "num_virtual_tokens": 4}, "task ids"),
        ({"peft_type": "LOHA"}, "LOHA"),
        ({"r": 4}, "unrecognised"),
    ],
)
def test_loader_dispatch_refusals(tmp_path, config, message):
    with pytest.raises(AdapterError, match=message):
        parse_adapter(config, tmp_path / "adapter_model.safetensors", None)


# ---- refusals -----------------------------------------------------------------


def _save(tmp_path: Path, config, arch: str = "llama", **kw) -> Path:
    base_cfg = kw.pop("base_config", None) or CONFIGS[arch]()
    make_peft_adapter(base_cfg, config, tmp_path, seed=0, **kw)
    return tmp_path


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def llama_wrapped() -> WrappedModel:
    return WrappedModel(build_from_config(tiny_llama_config(), seed=0), num_slots=2)


def test_refuses_modules_to_save(tmp_path, llama_wrapped):
    p = _save(tmp_path, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(AdapterError, match="modules_to_save"):
        load_adapter_dir(p, llama_wrapped)


@pytest.mark.parametrize("field,value", [("frobnicate", 1), ("layer_replication", [[0, 2]]), ("use_qalora", True)])
def test_refuses_fields_that_change_computation(tmp_path, llama_wrapped, field, value):
    p = _save(tmp_path, LoraConfig(r=2, target_modules=["q_proj"]))
    _edit_config(p, **{field: value})
    with pytest.raises(AdapterError, match=field):
        load_adapter_dir(p, llama_wrapped)


def test_refuses_adapter_matching_no_module(tmp_path, llama_wrapped):
    p = _save(tmp_path, LoraConfig(r=2, target_modules=["q_proj"]))
    _edit_config(p, target_modules=["c_attn", "query"])
    with pytest.raises(AdapterError, match="c_attn.*matches no module"):
        load_adapter_dir(p, llama_wrapped)


def test_refuses_weights_for_unknown_modules(tmp_path, llama_wrapped):
    p = _save(tmp_path, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True), arch="gpt2")
    _edit_config(p, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="transformer.h.0.attn.c_attn"):
        load_adapter_dir(p, llama_wrapped)


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens"]])
def test_refuses_modules_outside_decoder_layers(tmp_path, llama_wrapped, targets):
    p = _save(tmp_path, LoraConfig(r=2, target_modules=targets))
    with pytest.raises(AdapterError, match="cannot adapt"):
        load_adapter_dir(p, llama_wrapped)


def test_refuses_wrong_shapes(tmp_path, llama_wrapped):
    big = tiny_llama_config(hidden_size=128, intermediate_size=256)
    p = _save(tmp_path, LoraConfig(r=2, target_modules=["q_proj", "k_proj"]), base_config=big)
    with pytest.raises(AdapterError, match="shape"):
        load_adapter_dir(p, llama_wrapped)


def test_refuses_rank_that_disagrees_with_config(tmp_path, llama_wrapped):
    p = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]))
    _edit_config(p, r=8)
    with pytest.raises(AdapterError, match="rank 8"):
        load_adapter_dir(p, llama_wrapped)


def test_refuses_nan(tmp_path, llama_wrapped):
    p = _save(tmp_path, LoraConfig(r=2, target_modules=["v_proj"]))
    tensors = load_file(p / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, p / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="NaN"):
        load_adapter_dir(p, llama_wrapped)


def test_refuses_pickle_weights(tmp_path, llama_wrapped):
    model = make_peft_adapter(tiny_llama_config(), LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "x", seed=0)
    model.save_pretrained(str(tmp_path / "pickle"), safe_serialization=False)
    assert (tmp_path / "pickle" / "adapter_model.bin").is_file()
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter_dir(tmp_path / "pickle", llama_wrapped)


def test_refuses_bias_all_that_changes_layernorm(tmp_path):
    wrapped = WrappedModel(build_from_config(tiny_gpt2_config(), seed=0), num_slots=1)
    cfg = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    p = _save(tmp_path, cfg, arch="gpt2")
    tensors = load_file(p / "adapter_model.safetensors")
    tensors["base_model.model.transformer.h.0.ln_1.bias"] += 0.5
    save_file(tensors, p / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="bias.*ln_1"):
        load_adapter_dir(p, wrapped)
