"""The shipped demo model and its two LoRAs: loaded the real way, uploaded through the API, PEFT as the oracle.

Every other test builds its own tiny model; this one checks the files `make demo` relies on.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from harness import ServerThread
from peft import PeftModel
from registry_helpers import upload
from transformers import AutoModelForCausalLM

from loramux.model import DEMO_DIR, demo_adapter_dirs, load_base_model
from loramux.v1 import loramux_pb2 as pb

PROMPT = "The value of"
N = 6


def test_demo_model_loads_through_from_pretrained() -> None:
    base = load_base_model("demo", device="cpu")
    cfg = base.model.config
    assert base.name == "demo" and cfg.model_type == "llama"
    assert (DEMO_DIR / "model" / "model.safetensors").is_file()
    assert 500_000 < sum(p.numel() for p in base.model.parameters()) < 5_000_000
    # A trained BPE of a few thousand tokens, not bytes: common words are one token each.
    assert 2000 <= len(base.tokenizer) <= cfg.vocab_size <= 4096
    assert len(base.tokenizer.encode(" value of the function", add_special_tokens=False)) == 4
    assert json.loads((DEMO_DIR / "model" / "config.json").read_text())["dtype"] == "float16"


def peft_greedy(adapter: str | None, ids: list[int]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "model", dtype=torch.float32, local_files_only=True)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(demo_adapter_dirs()[adapter]))
    with torch.inference_mode():
        out = model.eval().generate(
            input_ids=torch.tensor([ids]), max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def test_demo_adapters_upload_and_change_the_output(tmp_path) -> None:
    adapters = demo_adapter_dirs()
    assert sorted(adapters) == ["english-prose", "python-code"]
    with ServerThread("demo", store=tmp_path / "store") as s:
        for name, path in adapters.items():
            weights = (path / "adapter_model.safetensors").read_bytes()
            got = upload(s.adapters, name, (path / "adapter_config.json").read_text(), weights, metadata=None)
            assert got.adapter_id == name and got.adapter_type == "lora"
        ids = s.server.base.tokenizer.encode(PROMPT, add_special_tokens=False)
        params = pb.SamplingParams(max_new_tokens=N, ignore_eos=True)
        names = ["", *adapters]
        with ThreadPoolExecutor(len(names)) as pool:  # sent together: the engine batches them
            futures = [
                pool.submit(s.gen.Generate, pb.GenerateRequest(adapter_id=a, prompt=PROMPT, params=params), timeout=120)
                for a in names
            ]
            served = {a: list(f.result().token_ids) for a, f in zip(names, futures)}
    assert len({tuple(t) for t in served.values()}) == 3, served
    for a, tokens in served.items():
        assert tokens == peft_greedy(a or None, ids), a


@pytest.mark.parametrize("name", ["english-prose", "python-code"])
def test_demo_adapter_files_are_peft_loras(name: str) -> None:
    cfg = json.loads((demo_adapter_dirs()[name] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    assert sorted(p.name for p in demo_adapter_dirs()[name].iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
