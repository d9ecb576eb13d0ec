"""Hostile or unlucky input through the real server: each gets its status, nothing else is hurt.

Safetensors files that look like pickles, configs that break regexes or recursion, a store
that links out of its root, huge ids, undecodable messages and prompts too big to tokenize.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from harness import ServerThread
from peft import LoraConfig
from peft_helpers import make_peft_adapter, transformers_greedy
from safetensors.torch import load, save

from loramux.adapters.store.safetensors_check import InvalidWeightsFile, check_safetensors
from loramux.model import tiny_llama_config
from loramux.v1 import loramux_pb2 as pb

Code = grpc.StatusCode
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("hostile") / "lora"
    return path, make_peft_adapter(tiny_llama_config(), LORA, path, seed=21)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with ServerThread(tiny_llama_dir, store=tmp_path_factory.mktemp("hostile-store")) as s:
        yield s


def upload(s: ServerThread, adapter_id: str, config: str, data: bytes) -> pb.Adapter:
    manifest = pb.AdapterManifest(
        adapter_id=adapter_id, config_json=config, weights_sha256=hashlib.sha256(data).hexdigest(),
        weights_size=len(data), overwrite=True,
    )  # fmt: skip
    chunks = [pb.UploadAdapterRequest(chunk=data[i : i + 65536]) for i in range(0, len(data), 65536)]
    return s.adapters.UploadAdapter(iter([pb.UploadAdapterRequest(manifest=manifest), *chunks]), timeout=120)


def refusal(fn, *args, **kw) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value


def greedy(model: torch.nn.Module, n: int) -> list[int]:
    return transformers_greedy(model, PROMPT, n)


def req(adapter: str = "", n: int = 6, **kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        adapter_id=adapter, prompt_token_ids=PROMPT, params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True), **kw
    )


def pickle_like(data: bytes) -> bytes:
    """The same safetensors file with its header padded (spaces, as the format allows) to a length
    whose first two little-endian bytes read as a pickle's opening: 0x80, then 0x02..0x05."""
    n = int.from_bytes(data[:8], "little")
    header, body = data[8 : 8 + n].rstrip(b" "), data[8 + n :]
    size = next(m for m in (k * 65536 + b * 256 + 0x80 for k in range(4) for b in (2, 3, 4, 5)) if m >= len(header))
    return size.to_bytes(8, "little") + header + b" " * (size - len(header)) + body


def test_a_valid_safetensors_file_that_starts_like_a_pickle_is_served(server, lora, tmp_path):
    path, model = lora
    data = pickle_like((path / "adapter_model.safetensors").read_bytes())
    assert data[0] == 0x80 and data[1] in (2, 3, 4, 5)
    (tmp_path / "w.safetensors").write_bytes(data)
    check_safetensors(tmp_path / "w.safetensors")  # parses
    upload(server, "pickle-like", (path / "adapter_config.json").read_text(), data)
    assert list(server.gen.Generate(req("pickle-like")).token_ids) == greedy(model, 6)
    # A real pickle is still named as one.
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf, _use_new_zipfile_serialization=False)
    (tmp_path / "p.safetensors").write_bytes(buf.getvalue())
    with pytest.raises(InvalidWeightsFile, match="pickle"):
        check_safetensors(tmp_path / "p.safetensors")


def _bad_configs(config: dict, weights: bytes) -> dict[str, tuple[str, bytes, str]]:
    """name -> (config_json, weights, the field the refusal must name)."""
    tensors = load(weights)
    q = [k for k in tensors if "layers.0.self_attn.q_proj" in k]
    empty = {k: (torch.zeros(0, t.shape[1]) if "lora_A" in k else torch.zeros(t.shape[0], 0)) if k in q else t
             for k, t in tensors.items()}  # fmt: skip
    deep = "[" * 100_000 + "]" * 100_000

    def cfg(**changes: object) -> str:
        return json.dumps({**config, **changes})

    header = json.dumps({"deep": 0}).replace("0", deep).encode()
    deep_header = len(header).to_bytes(8, "little") + header
    return {
        "deep-config": ('{"a": ' + deep + "}", weights, "config_json"),
        "deep-header": (cfg(), deep_header, "nested"),
        "regex-target": (cfg(target_modules="("), weights, "target_modules"),
        "regex-rank-pattern": (cfg(rank_pattern={"(": 2}), weights, "rank_pattern"),
        "regex-exclude": (cfg(exclude_modules="[a-"), weights, "exclude_modules"),
        "layers-abc": (cfg(layers_to_transform="abc"), weights, "layers_to_transform"),
        "layers-bools": (cfg(layers_to_transform=[True]), weights, "layers_to_transform"),
        "exclude-type": (cfg(exclude_modules=5), weights, "exclude_modules"),
        "layers-pattern-type": (cfg(layers_to_transform=[0], layers_pattern=5), weights, "layers_pattern"),
        "rank-0-pattern": (cfg(rank_pattern={"q_proj": 0}), save(empty), "rank_pattern"),
        "rank-0": (cfg(r=0), save(empty), "r must"),
    }


def test_bad_configs_are_invalid_argument_naming_the_field(server, lora):
    path, model = lora
    config = json.loads((path / "adapter_config.json").read_text())
    weights = (path / "adapter_model.safetensors").read_bytes()
    for name, (config_json, data, field) in _bad_configs(config, weights).items():
        e = refusal(upload, server, f"bad-{name}", config_json, data)
        assert e.code() == Code.INVALID_ARGUMENT, (name, e.code(), e.details())
        assert field in e.details(), (name, e.details())
    names = [a.adapter_id for a in server.adapters.ListAdapters(pb.ListAdaptersRequest()).adapters]
    assert not [n for n in names if n.startswith("bad-")]
    assert len(server.gen.Generate(req()).token_ids) == 6  # and the server serves on


def test_the_store_never_follows_a_link_out_of_its_root(tiny_llama_dir, lora, tmp_path, caplog):
    path, model = lora
    outside = tmp_path / "outside"
    shutil.copytree(path, outside / "adapter")
    (outside / "junk").mkdir()
    (outside / "junk" / "keep-me").write_text("x")
    store = tmp_path / "store"
    shutil.copytree(path, store / "good")
    (store / "linked").symlink_to(outside / "adapter", target_is_directory=True)
    (store / "half-linked").mkdir()
    shutil.copy(path / "adapter_config.json", store / "half-linked")
    (store / "half-linked" / "adapter_model.safetensors").symlink_to(outside / "adapter" / "adapter_model.safetensors")
    (store / ".staging").symlink_to(outside / "junk", target_is_directory=True)
    with ServerThread(tiny_llama_dir, store=store) as s:
        names = [a.adapter_id for a in s.adapters.ListAdapters(pb.ListAdaptersRequest()).adapters]
        assert names == ["good"]
        for bad in ("linked", "half-linked"):
            assert refusal(s.gen.Generate, req(bad)).code() == Code.NOT_FOUND
        assert list(s.gen.Generate(req("good")).token_ids) == greedy(model, 6)
    assert sorted(p.name for p in (outside / "adapter").iterdir()) == sorted(p.name for p in path.iterdir())
    assert (outside / "junk" / "keep-me").read_text() == "x"  # nothing outside was cleaned
    assert sum("symbolic link" in r.getMessage() for r in caplog.records) >= 3


def test_ids_are_bounded_and_never_echoed_whole(server):
    e = refusal(server.gen.Generate, req(request_id="r" * 257))
    assert e.code() == Code.INVALID_ARGUMENT and "request_id" in e.details()
    rid = "é" * 128  # 256 bytes
    assert server.gen.Generate(req(request_id=rid)).request_id == rid
    assert all(m.request_id == rid for m in server.gen.GenerateStream(req(request_id=rid)))
    huge = "a" * (1 << 20)
    e = refusal(server.gen.Generate, req(huge))
    assert e.code() == Code.NOT_FOUND and len(e.details()) < 1000
    e = refusal(server.adapters.GetAdapter, pb.GetAdapterRequest(adapter_id=huge))
    assert e.code() == Code.INVALID_ARGUMENT and len(e.details()) < 1000


def _rejected(s: ServerThread, reason: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=30).read().decode()
    want = f'loramux_requests_rejected_total{{reason="{reason}"}}'
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(want))


def test_an_undecodable_message_is_invalid_argument(server):
    bad_prompt = b"\x12\x02\xff\xfe"  # GenerateRequest field 2 (prompt): two bytes that are not UTF-8
    before = _rejected(server, "invalid_argument")
    for method, kind in (("Generate", "unary_unary"), ("GenerateStream", "unary_stream")):
        call = getattr(server.channel, kind)(f"/loramux.v1.Generation/{method}", request_serializer=lambda b: b)
        stream = kind == "unary_stream"
        e = refusal(lambda c=call, st=stream: list(c(bad_prompt, timeout=30)) if st else c(bad_prompt, timeout=30))
        assert e.code() == Code.INVALID_ARGUMENT and "UTF-8" in e.details(), (method, e.code())
    assert _rejected(server, "invalid_argument") == before + 2
    bad_manifest = b"\x0a\x04\x0a\x02\xff\xfe"  # UploadAdapterRequest.manifest.adapter_id, not UTF-8
    upload_call = server.channel.stream_unary("/loramux.v1.Adapters/UploadAdapter", request_serializer=lambda b: b)
    assert refusal(upload_call, iter([bad_manifest]), timeout=30).code() == Code.INVALID_ARGUMENT
    assert len(server.gen.Generate(req()).token_ids) == 6


def test_prompts_are_tokenized_off_the_event_loop_and_bounded_first(server):
    gen = server.server.generation
    gate = threading.Event()
    gen.prompts._pool.submit(gate.wait, 60)  # tokenization is held: a text prompt waits for it
    try:
        text = server.gen.Generate.future(pb.GenerateRequest(prompt="held", params=pb.SamplingParams(max_new_tokens=2)))
        # Meanwhile every other RPC answers: token-id prompts, the Adapters service...
        assert len(server.gen.Generate(req(), timeout=60).token_ids) == 6
        server.adapters.ListAdapters(pb.ListAdaptersRequest(), timeout=60)
        # ...and a prompt too big for the context is refused without being tokenized.
        too_big = pb.GenerateRequest(prompt="x" * (gen.prompts.max_chars + 1))
        e = refusal(server.gen.Generate, too_big, timeout=60)
        assert e.code() == Code.INVALID_ARGUMENT and "characters" in e.details()
        chat = pb.ChatMessage(role="user", content="x" * (gen.prompts.max_chars + 1))  # chat messages too
        e = refusal(server.gen.Generate, pb.GenerateRequest(messages=[chat]), timeout=60)
        assert e.code() == Code.INVALID_ARGUMENT and "characters" in e.details()
        assert not text.done()
    finally:
        gate.set()
    assert len(text.result(timeout=60).token_ids) == 2
