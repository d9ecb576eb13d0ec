"""AdapterHub bottleneck adapters: loramux equals the `adapters` library's recorded outputs, mixed batches too.

The fixtures (tests/fixtures/adapterhub, made by scripts/make_adapterhub_fixtures.py
in a separate venv with the `adapters` library) hold the tiny base models' weights,
each adapter as the library saved it, and the library's last-position logits and
greedy tokens. Nothing here imports `adapters`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft_helpers import greedy, mixed_logits, reference_logits
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from loramux.adapters.formats.adapterhub import BottleneckAdapter, parse_adapterhub
from loramux.adapters.formats.loader import load_adapter_dir
from loramux.adapters.kinds.base import AdapterError
from loramux.adapters.model.wrapped import WrappedModel
from loramux.engine.forward_context import BASE_SLOT

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
ATOL = 1e-5  # float32; a missing or misplaced adapter term is off by >1e-2
PROMPTS = [torch.tensor(p) for p in json.loads((FIXTURES / "prompts.json").read_text())["token_ids"]]
STEPS = json.loads((FIXTURES / "prompts.json").read_text())["greedy_steps"]
CASES = sorted(f"{d.parent.name}/{d.name}" for d in FIXTURES.glob("*/*") if (d / "adapter_config.json").is_file())


def load_base(arch: str) -> PreTrainedModel:
    # The committed weights, not a rebuild: transformers 4.57 and 5.x may initialise differently.
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / arch / "base", dtype=torch.float32, local_files_only=True)
    return model.eval().requires_grad_(False)


def expected(case: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / case / "expected.safetensors")


@pytest.fixture(scope="module")
def wrapped() -> dict[str, WrappedModel]:
    return {arch: WrappedModel(load_base(arch), num_slots=4) for arch in ("llama", "gpt2")}


def install(w: WrappedModel, case: str, slot: int) -> BottleneckAdapter:
    adapter = load_adapter_dir(FIXTURES / case, w)
    assert isinstance(adapter, BottleneckAdapter)
    adapter.to_device(w.device).install(w, slot)
    return adapter


@torch.no_grad()
def mixed_greedy(w: WrappedModel, prompts: list[torch.Tensor], slots: list[int], steps: int) -> list[list[int]]:
    """Greedy decoding of all sequences together: every step is one flat forward over all of them."""
    seqs, out = [p.clone() for p in prompts], [[] for _ in prompts]
    for _ in range(steps):
        for i, logits in enumerate(mixed_logits(w, seqs, slots)):
            tok = int(logits[-1].argmax())
            out[i].append(tok)
            seqs[i] = torch.cat([seqs[i], torch.tensor([tok])])
    return out


def test_fixtures_are_meaningful():
    # Each adapter moves the logits well past ATOL, so matching them says something.
    for case in CASES:
        base = expected(f"{case.split('/')[0]}/base")["last_logits"]
        assert (expected(case)["last_logits"] - base).abs().max() > 0.1, case


@pytest.mark.parametrize("case", CASES)
def test_alone_matches_library(wrapped, case):
    w = wrapped[case.split("/")[0]]
    adapter = install(w, case, slot=1)
    try:
        exp = expected(case)
        for i, p in enumerate(PROMPTS):
            got = mixed_logits(w, [p], [1])[0][-1]
            torch.testing.assert_close(got, exp["last_logits"][i], atol=ATOL, rtol=0)
            tokens = greedy(lambda ids: mixed_logits(w, [ids], [1])[0], p, STEPS)
            assert tokens == exp["greedy"][i].tolist(), (case, i)
    finally:
        adapter.uninstall(w, 1)
    assert adapter.info.adapter_type == "bottleneck" and not adapter.info.mergeable
    assert adapter.info.rank > 0 and adapter.info.target_modules
    assert adapter.nbytes() == sum(t.numel() * 4 for u in adapter.units.values() for t in u.tensors())


@pytest.fixture(scope="module")
def llama_lora(tmp_path_factory) -> tuple[Path, list[torch.Tensor], list[list[int]]]:
    """A PEFT LoRA on the same base, and PEFT's own last logits and greedy tokens (the LoRA oracle)."""
    path = tmp_path_factory.mktemp("lora")
    peft_model = get_peft_model(
        load_base("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(path))
    peft_model.eval()
    logits = [reference_logits(peft_model, p)[-1] for p in PROMPTS]
    tokens = [greedy(lambda ids: reference_logits(peft_model, ids), p, STEPS) for p in PROMPTS]
    return path, logits, tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_flat_batch(wrapped, llama_lora, arch):
    """Base rows, LoRA rows (llama) and several bottleneck kinds in one forward, two sequences sharing a slot."""
    w = wrapped[arch]
    kinds = ["seq_bn", "hybrid", "par_bn_opts"] if arch == "llama" else ["double_seq_bn", "hybrid"]
    adapters = [install(w, f"{arch}/{k}", slot) for slot, k in enumerate(kinds, start=1)]
    lora = load_adapter_dir(llama_lora[0], w) if arch == "llama" else None
    if lora is not None:
        lora.install(w, 0)
    try:
        # (prompt index, slot, expected last logits, expected greedy), grouped by slot as the runner orders rows
        base = expected(f"{arch}/base")
        rows = [(0, BASE_SLOT, base["last_logits"][0], base["greedy"][0].tolist())]
        if lora is not None:
            rows += [(i, 0, llama_lora[1][i], llama_lora[2][i]) for i in (1, 3)]
        for slot, k in enumerate(kinds, start=1):
            exp = expected(f"{arch}/{k}")
            idx = (0, 2) if slot == 1 else (slot % len(PROMPTS),)  # two sequences share slot 1
            rows += [(i, slot, exp["last_logits"][i], exp["greedy"][i].tolist()) for i in idx]
        prompts, slots = [PROMPTS[r[0]] for r in rows], [r[1] for r in rows]
        for (i, slot, exp_logits, _), got in zip(rows, mixed_logits(w, prompts, slots)):
            torch.testing.assert_close(got[-1], exp_logits, atol=ATOL, rtol=0, msg=f"prompt {i} slot {slot}")
        assert mixed_greedy(w, prompts, slots, STEPS) == [r[3] for r in rows]
    finally:
        for slot, a in enumerate(adapters, start=1):
            a.uninstall(w, slot)
        if lora is not None:
            lora.uninstall(w, 0)


def test_uninstall_restores_base(wrapped):
    w = wrapped["llama"]
    install(w, "llama/double_seq_bn", 2).uninstall(w, 2)
    got = mixed_logits(w, [PROMPTS[1]], [2])[0][-1]  # slot 2 is empty again: base behaviour
    torch.testing.assert_close(got, expected("llama/base")["last_logits"][1], atol=ATOL, rtol=0)
    assert all(not p.occupied for b in w.blocks.values() for p in b.points.values())


# --- refusals -------------------------------------------------------------------------------------


def copy_case(tmp_path: Path, case: str = "llama/seq_bn") -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(FIXTURES / case, dst)
    return dst


def edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    for k, v in changes.items():
        cfg["config"][k] = v
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("phm_layer", True, "phm_layer"),
        ("inv_adapter", "nice", "inv_adapter"),
        ("cross_adapter", True, "cross_adapter"),
        ("use_gating", True, "use_gating"),
        ("residual_before_ln", "post_add", "post_add"),
        ("non_linearity", "prelu", "prelu"),
        ("non_linearity", "no_such_act", "no_such_act"),
        ("brand_new_option", 1, "brand_new_option"),
        ("reduction_factor", {"0": 16}, "no entry for layer 1"),
        ("reduction_factor", 8, "shape"),
        ("scaling", "sometimes", "scaling"),
        ("ln_after", True, "adapter_norm_after"),
        ("mh_adapter", True, "no weights"),
        ("leave_out", [1], "config places no adapter"),
    ],
)
def test_refuses_config(tmp_path, wrapped, field, value, message):
    path = copy_case(tmp_path)
    edit_config(path, **{field: value})
    with pytest.raises(AdapterError, match=message):
        load_adapter_dir(path, wrapped["llama"])


def test_refuses_union_with_other_methods(tmp_path, wrapped):
    path = copy_case(tmp_path, "llama/hybrid")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["config"]["configs"].append({"architecture": "prefix_tuning", "prefix_length": 10})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="prefix_tuning"):
        load_adapter_dir(path, wrapped["llama"])


@pytest.mark.parametrize("change", ["nan", "shape", "extra", "other_name", "pickle"])
def test_refuses_bad_weights(tmp_path, wrapped, change):
    path = copy_case(tmp_path)
    file = path / "adapter.safetensors"
    w = load_file(file)
    key = next(k for k in w if k.endswith("adapter_up.weight"))
    if change == "nan":
        w[key][0, 0] = float("nan")
    elif change == "shape":
        w[key] = w[key][:, :-1].contiguous()
    elif change == "extra":
        w["model.invertible_adapters.seq_bn.F.0.weight"] = torch.zeros(2)
    elif change == "other_name":
        w = {k.replace(".seq_bn.", ".other."): v for k, v in w.items()}
    if change == "pickle":
        file.unlink()
        torch.save(w, path / "pytorch_adapter.bin")
    else:
        save_file(w, file)
    with pytest.raises(AdapterError):
        load_adapter_dir(path, wrapped["llama"])


def test_refuses_other_base_models(wrapped):
    cfg = json.loads((FIXTURES / "llama/seq_bn/adapter_config.json").read_text())
    weights = FIXTURES / "llama/seq_bn/adapter.safetensors"
    with pytest.raises(AdapterError, match="'llama' model"):
        parse_adapterhub(cfg, weights, wrapped["gpt2"])
    with pytest.raises(AdapterError, match="match no bottleneck adapter"):  # GPT-2's layers are transformer.h.N
        parse_adapterhub({**cfg, "model_type": "gpt2"}, weights, wrapped["gpt2"])
    with pytest.raises(AdapterError, match="hidden_size"):
        parse_adapterhub({**cfg, "hidden_size": 32}, weights, wrapped["llama"])
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=259,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    w = WrappedModel(qwen.eval(), num_slots=1)
    assert w.blocks == {}
    with pytest.raises(AdapterError, match="qwen2"):
        parse_adapterhub(cfg, weights, w)


# --- through the real server: flat batches with a KV cache, slots evicted and reused -----------


def test_served_in_mixed_batches(tmp_path):
    from harness import ServerThread

    from loramux.model import byte_tokenizer
    from loramux.v1 import loramux_pb2 as pb

    model_dir, store = tmp_path / "base", tmp_path / "store"
    shutil.copytree(FIXTURES / "llama" / "base", model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    cases = [c for c in CASES if c.startswith("llama/")]
    for case in cases:
        (store / case.split("/")[1]).mkdir(parents=True)
        for f in ("adapter_config.json", "adapter.safetensors"):
            shutil.copy(FIXTURES / case / f, store / case.split("/")[1] / f)
    jobs = [(case, i) for case in [*cases, "llama/base"] for i in range(len(PROMPTS))]
    with ServerThread(model_dir, store=store, max_device_adapters=3) as s:
        futures = [
            s.gen.Generate.future(
                pb.GenerateRequest(
                    adapter_id="" if case == "llama/base" else case.split("/")[1],
                    prompt_token_ids=PROMPTS[i].tolist(),
                    params=pb.SamplingParams(max_new_tokens=STEPS, ignore_eos=True),
                )
            )
            for case, i in jobs
        ]
        for (case, i), fut in zip(jobs, futures):
            assert list(fut.result(timeout=300).token_ids) == expected(case)["greedy"][i].tolist(), (case, i)


@pytest.mark.parametrize("spelling", ["norm_before_only", "both_equal", "both_differ"])
def test_ln_before_either_name(tmp_path, wrapped, spelling):
    # The library registers ln_before's LayerNorm as adapter_down.0 and adapter_norm_before; files may hold either.
    path = copy_case(tmp_path, "llama/seq_bn_opts")
    w = load_file(path / "adapter.safetensors")
    for k in [k for k in w if ".adapter_down.0." in k]:
        alias = k.replace(".adapter_down.0.", ".adapter_norm_before.")
        w[alias] = w[k] + (1.0 if spelling == "both_differ" else 0.0)
        if spelling == "norm_before_only":
            del w[k]
    save_file(w, path / "adapter.safetensors")
    wm = wrapped["llama"]
    if spelling == "both_differ":
        with pytest.raises(AdapterError, match="differ"):
            load_adapter_dir(path, wm)
        return
    adapter = load_adapter_dir(path, wm)
    adapter.install(wm, 3)
    try:
        got = mixed_logits(wm, [PROMPTS[1]], [3])[0][-1]
        torch.testing.assert_close(got, expected("llama/seq_bn_opts")["last_logits"][1], atol=ATOL, rtol=0)
    finally:
        adapter.uninstall(wm, 3)


def test_bfloat16_base():
    # Units take the model's dtype; bfloat16 rounding allows only a loose comparison.
    w = WrappedModel(load_base("llama").to(torch.bfloat16), num_slots=1)
    adapter = load_adapter_dir(FIXTURES / "llama/hybrid", w)
    assert all(t.dtype == torch.bfloat16 for u in adapter.units.values() for t in u.tensors())
    adapter.install(w, 0)
    got = mixed_logits(w, [PROMPTS[1]], [0])[0][-1].float()
    exp = expected("llama/hybrid")["last_logits"][1]
    assert (got - exp).abs().max() < 0.1 * exp.abs().max()
