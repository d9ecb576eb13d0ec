"""Soft prompts (PEFT prompt tuning, p-tuning, prefix tuning) served per request, in mixed batches.

The oracle is PeftModel's forward recomputed over the whole sequence at every step
(not PEFT's `generate`, which disagrees with its own forward for prompt-learning
types under transformers 5). loramux's greedy tokens and each step's logits must
equal it, alone and in batches shared with LoRA and base-model rows.
"""

from __future__ import annotations

import copy
import json
import random
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
import torch
from harness import Hold, ServerThread, wait_until
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from peft_helpers import make_peft_adapter
from safetensors.torch import save_file

from loramux.adapters.formats.loader import load_adapter_dir
from loramux.adapters.kinds.base import AdapterError
from loramux.adapters.model.wrapped import WrappedModel
from loramux.model import build_from_config, tiny_llama_config
from loramux.v1 import loramux_pb2 as pb

STEPS = 8
SOFT = {
    "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "ptuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
    "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
}
# Scale of the random prompt-encoder weights: large enough that every soft prompt changes the output.
_SCALE = {"prompt": 1.0, "ptuning": 0.5, "prefix": 2.0}


def make_soft_prompt(name: str, path: Path, seed: int, base_config=None, config=None) -> PeftModel:
    """A PEFT prompt-learning model over the seed-0 tiny Llama with random encoder weights, saved to `path`."""
    # PEFT fills token_dim, num_layers, ... into the config object it is given: pass a copy.
    peft_config = copy.deepcopy(config or SOFT[name])
    model = get_peft_model(build_from_config(base_config or tiny_llama_config(), seed=0), peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.copy_(_SCALE[name] * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(path))
    return model.eval()


@torch.no_grad()
def forward_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's last logits [vocab], by a full forward over the sequence so far."""
    seq, tokens, logits = list(ids), [], []
    for _ in range(n):
        last = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        logits.append(last)
        tokens.append(int(last.argmax()))
        seq.append(tokens[-1])
    return tokens, logits


class LogitSpy:
    """Records, per request id, the logits row the engine sampled from at every step, and each batch's adapters."""

    def __init__(self, runner) -> None:
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.batches: list[tuple[list[str], list[str]]] = []  # (prefill adapters, decode adapters)
        inner = runner.run

        def run(batch):
            out = inner(batch)
            for r, row in zip(batch.requests, out):
                if r.num_computed + r.num_scheduled == r.seq_len:  # not a prompt chunk that samples nothing yet
                    self.rows[r.request_id].append(row.clone())
            self.batches.append(([r.adapter_id for r in batch.prefill], [r.adapter_id for r in batch.decode]))
            return out

        runner.run = run


def req(ids: list[int], n: int, adapter: str = "", rid: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter,
        prompt_token_ids=ids,
        request_id=rid,
        params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True),
    )


def assert_matches(spy: LogitSpy, rid: str, got: list[int], want: tuple[list[int], list[torch.Tensor]]) -> None:
    tokens, logits = want
    assert got == tokens, rid
    assert len(spy.rows[rid]) == len(logits), rid
    for step, (a, b) in enumerate(zip(spy.rows[rid], logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m, s=step: f"{rid} step {s}: {m}")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three soft prompts and a LoRA in one store, with their PEFT models as the oracle."""
    root = tmp_path_factory.mktemp("soft-store")
    models = {name: make_soft_prompt(name, root / name, seed=200 + i) for i, name in enumerate(SOFT)}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    models["lora"] = make_peft_adapter(tiny_llama_config(), lora, root / "lora", seed=300)
    return root, models


@pytest.fixture(scope="module")
def wrapped() -> WrappedModel:
    return WrappedModel(build_from_config(tiny_llama_config(), seed=0), 2)


def test_parse_kinds_and_shapes(store, wrapped):
    root, _ = store
    prompt = load_adapter_dir(root / "prompt", wrapped)
    assert (prompt.info.adapter_type, prompt.info.rank, prompt.info.mergeable) == ("prompt", 5, False)
    assert prompt.embeddings.shape == (5, 64) and prompt.prefix is None
    assert load_adapter_dir(root / "ptuning", wrapped).embeddings.shape == (4, 64)
    prefix = load_adapter_dir(root / "prefix", wrapped)
    assert (prefix.info.adapter_type, prefix.info.rank, prefix.info.mergeable) == ("prefix", 6, False)
    # GQA: PEFT sizes the prefix for the 2 key/value heads (head_dim 16), not the 4 query heads.
    assert prefix.prefix.shape == (2, 2, 2, 6, 16)


def test_each_kind_alone_equals_peft_forward(store, tiny_llama_dir, reference_llama):
    root, models = store
    prompts = [[b + 3 for b in b"soft prompts"], [7]]
    with ServerThread(tiny_llama_dir, store=root, max_device_adapters=4) as s:
        spy = LogitSpy(s.engine.runner)
        for name in SOFT:
            for j, ids in enumerate(prompts):
                rid = f"{name}-{j}"
                got = list(s.gen.Generate(req(ids, STEPS, name, rid)).token_ids)
                want = forward_greedy(models[name], ids, STEPS)
                assert_matches(spy, rid, got, want)
                # The soft prompt really changes the output.
                assert want[0] != forward_greedy(reference_llama, ids, STEPS)[0], rid


def test_mixed_batches_with_lora_and_base_rows(store, tiny_llama_dir, reference_llama):
    """4 adapters over 3 device slots, concurrent requests with base rows: all exact, and batches really mix."""
    root, models = store
    rng = random.Random(9)
    names = [*SOFT, "lora", ""]
    cases = []
    for i in range(12):
        ids = [rng.randrange(3, 259) for _ in range(rng.randint(1, 14))]
        cases.append((f"mix-{i}", ids, rng.randint(2, STEPS), names[i % len(names)]))
    with ServerThread(tiny_llama_dir, store=root, max_device_adapters=3) as s:
        spy = LogitSpy(s.engine.runner)
        futures = [s.gen.Generate.future(req(ids, n, a, rid)) for rid, ids, n, a in cases]
        results = [list(f.result(timeout=300).token_ids) for f in futures]
    for (rid, ids, n, a), got in zip(cases, results):
        assert_matches(spy, rid, got, forward_greedy(models[a] if a else reference_llama, ids, n))
    soft = set(SOFT)
    mixed = [p + d for p, d in spy.batches if soft & set(p + d) and set(p + d) - soft]
    assert mixed, "no batch held a soft-prompt row together with a LoRA or base row"
    assert any(soft & set(p) and len(p + d) > 1 for p, d in spy.batches), "no soft prompt prefilled in a shared batch"


def test_soft_prompts_on_tiny_blocks_with_chunks_and_prefix_hits(store, tiny_llama_dir):
    """Virtual rows and KV prefixes split over 4-token blocks and 8-token steps, then reused from the cache."""
    root, models = store
    ids = [b + 3 for b in b"a prompt that fills blocks"]
    with ServerThread(tiny_llama_dir, store=root, max_device_adapters=4, block_size=4, max_batch_tokens=8) as s:
        for name in SOFT:
            want = forward_greedy(models[name], ids, STEPS)[0]
            first = s.gen.Generate(req(ids, STEPS, name))
            again = s.gen.Generate(req(ids, STEPS, name))
            virtual = s.engine.runner.virtual_tokens(_slot_of(s, name))
            assert first.cached_tokens == 0, name
            # every full block before the last position is reused: virtual positions first, then prompt tokens
            assert again.cached_tokens == (virtual + len(ids) - 1) // 4 * 4 - virtual, name
            assert list(first.token_ids) == want and list(again.token_ids) == want, name
        base = s.gen.Generate(req(ids, STEPS))
        assert base.cached_tokens == 0, "a soft-prompted request's blocks were reused without its soft prompt"


def _slot_of(s: ServerThread, adapter_id: str) -> int:
    (slot,) = [sl.index for sl in s.server.cache.slots if sl.key is not None and sl.key[0] == adapter_id]
    return slot


def test_prompt_encoder_weights_are_run_at_load(tmp_path, wrapped):
    """A file with the encoder's own weights (not prompt_embeddings): run once at load, as PEFT's get_prompt."""
    cases = {
        "mlp": ("ptuning", SOFT["ptuning"]),
        "lstm": ("ptuning", PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16,
                                                encoder_reparameterization_type="LSTM")),
        "projection": ("prefix", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                    prefix_projection=True, encoder_hidden_size=24)),
    }  # fmt: skip
    for label, (kind, cfg) in cases.items():
        saved, raw = tmp_path / label, tmp_path / f"{label}-raw"
        model = make_soft_prompt(kind, saved, seed=7, config=cfg)
        raw.mkdir()
        (raw / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
        encoder = model.prompt_encoder["default"].state_dict()
        state = {f"prompt_encoder.default.{k}": v.contiguous() for k, v in encoder.items()}
        save_file(state, str(raw / "adapter_model.safetensors"))
        a, b = load_adapter_dir(saved, wrapped), load_adapter_dir(raw, wrapped)
        ta = a.embeddings if a.embeddings is not None else a.prefix
        tb = b.embeddings if b.embeddings is not None else b.prefix
        torch.testing.assert_close(tb, ta, rtol=0, atol=1e-6, msg=label)


def test_config_for_another_model_is_refused(tmp_path, wrapped):
    make_soft_prompt("prompt", tmp_path / "wide", seed=1, base_config=tiny_llama_config(hidden_size=96))
    with pytest.raises(AdapterError, match="token_dim"):
        load_adapter_dir(tmp_path / "wide", wrapped)
    make_soft_prompt("prefix", tmp_path / "deep", seed=1, base_config=tiny_llama_config(num_hidden_layers=3))
    with pytest.raises(AdapterError, match="num_layers"):
        load_adapter_dir(tmp_path / "deep", wrapped)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"peft_type": "MULTITASK_PROMPT_TUNING"}, "task ids"),
        ({"task_type": "SEQ_CLS"}, "CAUSAL_LM"),
        ({"num_virtual_tokens": 7}, "shape"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_transformer_submodules": 2}, "num_transformer_submodules"),
        ({"some_new_option": True}, "some_new_option"),
    ],
)
def test_bad_configs_are_refused(store, tmp_path, wrapped, change, message):
    root, _ = store
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes((root / "prompt" / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((root / "prompt" / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(AdapterError, match=message):
        load_adapter_dir(d, wrapped)


def test_nan_embeddings_are_refused(store, tmp_path, wrapped):
    root, _ = store
    d = tmp_path / "nan"
    d.mkdir()
    (d / "adapter_config.json").write_text((root / "prefix" / "adapter_config.json").read_text())
    save_file({"prompt_embeddings": torch.full((6, 128), float("nan"))}, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN"):
        load_adapter_dir(d, wrapped)


def test_virtual_tokens_count_against_the_context(store, tiny_llama_dir):
    """prompt + virtual tokens + max_new_tokens must fit: 20 + 6 + 8 > 32 is refused; the base model fits."""
    root, _ = store
    ids = list(range(10, 30))
    with ServerThread(tiny_llama_dir, store=root, max_model_len=32) as s:
        assert len(s.gen.Generate(req(ids, 8)).token_ids) == 8
        with pytest.raises(grpc.RpcError) as e:
            s.gen.Generate(req(ids, 8, "prefix"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "virtual tokens" in e.value.details()
        assert len(s.gen.Generate(req(ids, 6, "prefix")).token_ids) == 6  # 20 + 6 + 6 = 32 fits


def _upload(s: ServerThread, adapter_id: str, directory: Path) -> pb.Adapter:
    import hashlib

    weights = (directory / "adapter_model.safetensors").read_bytes()
    manifest = pb.AdapterManifest(
        adapter_id=adapter_id,
        config_json=(directory / "adapter_config.json").read_text(),
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        weights_size=len(weights),
    )
    chunks = [pb.UploadAdapterRequest(chunk=weights[i : i + 4096]) for i in range(0, len(weights), 4096)]
    return s.adapters.UploadAdapter(iter([pb.UploadAdapterRequest(manifest=manifest), *chunks]), timeout=60)


def test_upload_list_and_serve(store, tiny_llama_dir, tmp_path):
    root, models = store
    make_soft_prompt("prefix", tmp_path / "deep", seed=1, base_config=tiny_llama_config(num_hidden_layers=3))
    with ServerThread(tiny_llama_dir, store=tmp_path / "empty") as s:
        try:
            got = _upload(s, "up-prompt", root / "prompt")
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE):
                pytest.skip(f"the Adapters service does not take uploads here: {e.details()}")
            raise
        assert (got.adapter_type, got.rank) == ("prompt", 5)
        assert (_upload(s, "up-prefix", root / "prefix").adapter_type, 6) == ("prefix", 6)
        listed = {a.adapter_id: a.adapter_type for a in s.adapters.ListAdapters(pb.ListAdaptersRequest()).adapters}
        assert listed == {"up-prompt": "prompt", "up-prefix": "prefix"}
        ids = [b + 3 for b in b"uploaded"]
        for adapter, name in (("up-prompt", "prompt"), ("up-prefix", "prefix")):
            want = forward_greedy(models[name], ids, STEPS)[0]
            assert list(s.gen.Generate(req(ids, STEPS, adapter)).token_ids) == want
        with pytest.raises(grpc.RpcError) as e:
            _upload(s, "up-deep", tmp_path / "deep")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_layers" in e.value.details()


def test_a_failing_request_does_not_fail_its_batch(store, tiny_llama_dir, reference_llama, caplog):
    """A forward that fails is rerun request by request: only the broken one gets INTERNAL.

    The failure is real, not mocked: the installed soft prompt's embeddings are replaced by
    ones of the wrong width, so placing them into the batch's embeddings raises.
    """

    import grpc

    root, _ = store
    with ServerThread(tiny_llama_dir, store=root, max_device_adapters=4) as s:
        s.gen.Generate(req([5, 6], 1, "prompt"))  # loads it into a slot
        (sp,) = [p for p in s.server.wrapped.soft_prompts.values() if p.embeddings is not None]
        sp.embeddings = torch.zeros(sp.embeddings.shape[0], sp.embeddings.shape[1] + 1)
        # Hold the engine loop so that all four requests are admitted in one step, one batch.
        prompts = [[7, 8, 9], [10, 11], [12, 13, 14, 15]]
        with Hold(s.engine):
            futures = [s.gen.Generate.future(req(p, 6)) for p in prompts]
            broken = s.gen.Generate.future(req([5, 6, 7], 6, "prompt"))
            wait_until(lambda: s.engine.num_waiting == 4, "4 requests queued")
        with pytest.raises(grpc.RpcError) as e:
            broken.result(timeout=120)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        for p, f in zip(prompts, futures):
            assert list(f.result(timeout=120).token_ids) == forward_greedy(reference_llama, p, 6)[0]
        assert list(s.gen.Generate(req([1, 2, 3], 4)).token_ids) == forward_greedy(reference_llama, [1, 2, 3], 4)[0]
    assert any("forward failed for 4 requests" in r.getMessage() for r in caplog.records)


def test_a_failing_batch_with_a_prompt_chunk_reruns_the_chunk_alone(store, tiny_llama_dir, reference_llama, caplog):
    """The failing batch also holds the first chunk of a long prompt: rerun alone, it commits only its
    positions (it samples nothing yet), and the prompt's later chunks and its tokens equal transformers'."""
    root, _ = store
    with ServerThread(tiny_llama_dir, store=root, max_device_adapters=4, block_size=4, max_batch_tokens=24) as s:
        s.gen.Generate(req([5, 6], 1, "prompt"))  # loads it into a slot
        (sp,) = [p for p in s.server.wrapped.soft_prompts.values() if p.embeddings is not None]
        sp.embeddings = torch.zeros(sp.embeddings.shape[0], sp.embeddings.shape[1] + 1)
        prompts = [[7, 8, 9], [10, 11], [12, 13, 14, 15]]
        long = [3 + (7 * i) % 250 for i in range(40)]  # after the others' 17 positions, 7 of the budget are left
        batches: list[list[tuple[int, bool]]] = []  # (prompt length, a chunk short of the prompt's end?) per row
        inner = s.engine.runner.run

        def run(batch):
            batches.append([(r.prompt_len, r.num_computed + r.num_scheduled < r.seq_len) for r in batch.requests])
            return inner(batch)

        s.engine.runner.run = run
        with Hold(s.engine):
            futures = [s.gen.Generate.future(req(p, 6)) for p in prompts]
            broken = s.gen.Generate.future(req([5, 6, 7], 6, "prompt"))
            chunked = s.gen.Generate.future(req(long, 6))
            wait_until(lambda: s.engine.num_waiting == 5, "5 requests queued")
        with pytest.raises(grpc.RpcError) as e:
            broken.result(timeout=120)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        for p, f in zip(prompts + [long], futures + [chunked]):
            assert list(f.result(timeout=120).token_ids) == forward_greedy(reference_llama, p, 6)[0]
        assert len(batches[0]) == 5 and (40, True) in batches[0]  # the failing batch held the long prompt's chunk
        assert [(40, True)] in batches[1:6]  # rerun alone: still a chunk, it sampled nothing
    assert any("forward failed for 5 requests" in r.getMessage() for r in caplog.records)
