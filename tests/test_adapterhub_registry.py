"""Bottleneck adapters through the registry: uploaded over gRPC, listed as `bottleneck`, served exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
from harness import ServerThread
from registry_helpers import upload
from safetensors.torch import load_file

from loramux.model import byte_tokenizer
from loramux.v1 import loramux_pb2 as pb

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bn-registry")
    model_dir = root / "base"
    shutil.copytree(FIXTURES / "llama" / "base", model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    with ServerThread(model_dir, store=root / "store", max_device_adapters=2) as s:
        yield s


@pytest.mark.parametrize("case", ["seq_bn", "double_seq_bn", "par_bn", "hybrid", "seq_bn_opts"])
def test_upload_then_generate_equals_library(server, case):
    src = FIXTURES / "llama" / case
    info = upload(
        server.adapters,
        f"bn-{case}",
        (src / "adapter_config.json").read_text(),
        (src / "adapter.safetensors").read_bytes(),
        metadata=None,
    )
    assert info.adapter_type == "bottleneck" and info.rank > 0
    got = server.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id=f"bn-{case}"))
    assert got.adapter_type == "bottleneck" and got.sha256 == info.sha256
    want = load_file(src / "expected.safetensors")["greedy"]
    prompts = json.loads((FIXTURES / "prompts.json").read_text())["token_ids"]
    steps = want.shape[1]
    for i, p in enumerate(prompts):
        req = pb.GenerateRequest(
            adapter_id=f"bn-{case}", prompt_token_ids=p, params=pb.SamplingParams(max_new_tokens=steps, ignore_eos=True)
        )
        assert list(server.gen.Generate(req, timeout=120).token_ids) == want[i].tolist()


def test_unsupported_option_is_refused_on_upload(server):
    src = FIXTURES / "llama" / "seq_bn"
    config = json.loads((src / "adapter_config.json").read_text())
    config["config"]["phm_layer"] = True
    with pytest.raises(grpc.RpcError) as e:
        upload(server.adapters, "bn-phm", json.dumps(config), (src / "adapter.safetensors").read_bytes(), metadata=None)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "phm_layer" in e.value.details()
