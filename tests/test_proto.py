"""The committed gRPC stubs are generated from the committed proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_current(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "proto"),
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "proto/loramux/v1/loramux.proto"),
        ],
        check=True,
    )
    for name in ("loramux_pb2.py", "loramux_pb2_grpc.py", "loramux_pb2.pyi"):
        fresh = (tmp_path / "loramux/v1" / name).read_text()
        committed = (ROOT / "server/loramux/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"


def test_contract_names():
    from loramux.v1 import loramux_pb2 as pb

    assert pb.DESCRIPTOR.package == "loramux.v1"
    assert set(pb.DESCRIPTOR.services_by_name) == {"Generation", "Adapters"}
    assert [v.name for v in pb.FinishReason.DESCRIPTOR.values] == [
        "FINISH_REASON_UNSPECIFIED",
        "FINISH_REASON_LENGTH",
        "FINISH_REASON_EOS",
        "FINISH_REASON_STOP",
    ]
    assert pb.GenerateRequest.DESCRIPTOR.fields_by_name["return_logprobs"].number == 6
    assert pb.SamplingParams.DESCRIPTOR.fields_by_name["seed"].has_presence
