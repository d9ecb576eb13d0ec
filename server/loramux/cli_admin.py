"""loramux upload | adapters list | get | delete | load | unload: the Adapters service from the shell.

grpc and the stubs are imported inside the commands, so `loramux serve` and
`--help` do not pay for them. The admin token is read when a command runs: from
`--admin-token-file`, else the LORAMUX_ADMIN_TOKEN environment variable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TOKEN_ENV = "LORAMUX_ADMIN_TOKEN"
DEFAULT_SERVER = "localhost:50051"
CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
ADAPTERHUB_WEIGHTS = "adapter.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_adapter.bin", "adapter_model.pt", "adapter.bin")
CHUNK_BYTES = 1 << 20  # well under the server's default 64 MiB message limit


class CliError(Exception):
    """A problem with the command's input (exit status 2), reported without a traceback."""


def add_admin_parsers(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("upload", help="upload an adapter directory (adapter_config.json + safetensors weights)")
    u.add_argument("dir", type=Path, help="the adapter directory, e.g. from PEFT save_pretrained")
    u.add_argument("--id", required=True, dest="adapter_id", help="the adapter id to publish it under")
    u.add_argument("--overwrite", action="store_true", help="replace an existing adapter with this id")
    _common(u)
    u.set_defaults(func=_upload)

    a = sub.add_parser("adapters", help="list, inspect, delete, load or unload the server's adapters")
    asub = a.add_subparsers(dest="adapters_command", required=True)
    ls = asub.add_parser("list", help="every adapter, page by page")
    ls.add_argument("--page-size", type=int, default=0, help="adapters per request (0 = the server's default)")
    _common(ls)
    ls.set_defaults(func=_list)
    for name, help_text, fn in (
        ("get", "one adapter's details", _get),
        ("delete", "delete an adapter", _delete),
        ("load", "load an adapter into a device slot", _load),
        ("unload", "unpin an adapter and free its device slot", _unload),
    ):
        p = asub.add_parser(name, help=help_text)
        p.add_argument("adapter_id", metavar="ID")
        if name == "load":
            p.add_argument("--pin", action="store_true", help="keep it resident until unloaded")
            p.add_argument("--merge", action="store_true", help="also keep merged weights (needs the merged cache)")
        _common(p)
        p.set_defaults(func=fn)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=DEFAULT_SERVER, help=f"HOST:PORT (default {DEFAULT_SERVER})")
    p.add_argument("--admin-token-file", type=Path, default=None, help=f"admin token file (else ${TOKEN_ENV})")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM root certificate: connect with TLS")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call")
    p.add_argument("--json", action="store_true", help="print JSON with the contract's field names")


# ---- commands ------------------------------------------------------------------


def _upload(a: argparse.Namespace) -> int:
    from loramux.v1 import loramux_pb2 as pb

    def run(stub: Any, metadata: list[tuple[str, str]]) -> None:
        config_text, weights = _adapter_files(a.dir)
        digest, size = _sha256_and_size(weights)
        manifest = pb.AdapterManifest(
            adapter_id=a.adapter_id, config_json=config_text, weights_sha256=digest, weights_size=size,
            overwrite=a.overwrite,
        )  # fmt: skip

        def messages() -> Iterator[pb.UploadAdapterRequest]:
            yield pb.UploadAdapterRequest(manifest=manifest)
            with weights.open("rb") as f:  # streamed: the file is never in memory whole
                while chunk := f.read(CHUNK_BYTES):
                    yield pb.UploadAdapterRequest(chunk=chunk)

        _print_adapter(stub.UploadAdapter(messages(), metadata=metadata, timeout=a.timeout), a.json)

    return _with_stub(a, "upload", run)


def _list(a: argparse.Namespace) -> int:
    from loramux.v1 import loramux_pb2 as pb

    def run(stub: Any, metadata: list[tuple[str, str]]) -> None:
        adapters, token = [], ""
        while True:
            page = stub.ListAdapters(
                pb.ListAdaptersRequest(page_size=a.page_size, page_token=token), metadata=metadata, timeout=a.timeout
            )
            adapters.extend(page.adapters)
            token = page.next_page_token
            if not token:
                break
        if a.json:
            print(json.dumps([_to_dict(m) for m in adapters], indent=2))
        elif not adapters:
            print("no adapters")
        else:
            print(_HEADER)
            for m in adapters:
                print(_line(m))

    return _with_stub(a, "adapters list", run)


def _get(a: argparse.Namespace) -> int:
    from loramux.v1 import loramux_pb2 as pb

    return _with_stub(
        a,
        "adapters get",
        lambda stub, md: _print_adapter(
            stub.GetAdapter(pb.GetAdapterRequest(adapter_id=a.adapter_id), metadata=md, timeout=a.timeout), a.json
        ),
    )


def _delete(a: argparse.Namespace) -> int:
    from loramux.v1 import loramux_pb2 as pb

    def run(stub: Any, metadata: list[tuple[str, str]]) -> None:
        stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=a.adapter_id), metadata=metadata, timeout=a.timeout)
        print(json.dumps({"deleted": a.adapter_id}) if a.json else f"deleted {a.adapter_id}")

    return _with_stub(a, "adapters delete", run)


def _load(a: argparse.Namespace) -> int:
    from loramux.v1 import loramux_pb2 as pb

    req = pb.LoadAdapterRequest(adapter_id=a.adapter_id, pin=a.pin, merge=a.merge)
    return _with_stub(
        a,
        "adapters load",
        lambda stub, md: _print_adapter(stub.LoadAdapter(req, metadata=md, timeout=a.timeout), a.json),
    )


def _unload(a: argparse.Namespace) -> int:
    from loramux.v1 import loramux_pb2 as pb

    req = pb.UnloadAdapterRequest(adapter_id=a.adapter_id)
    return _with_stub(
        a,
        "adapters unload",
        lambda stub, md: _print_adapter(stub.UnloadAdapter(req, metadata=md, timeout=a.timeout), a.json),
    )


# ---- plumbing ------------------------------------------------------------------


def _with_stub(a: argparse.Namespace, what: str, run: Any) -> int:
    """Open the channel, run the command; errors become one line on stderr and an exit status."""
    import grpc

    from loramux.v1 import loramux_pb2_grpc as pb_grpc

    try:
        metadata = _metadata(a.admin_token_file)
        if a.tls_ca is not None:
            channel = grpc.secure_channel(a.server, grpc.ssl_channel_credentials(a.tls_ca.read_bytes()))
        else:
            channel = grpc.insecure_channel(a.server)
        with channel:
            run(pb_grpc.AdaptersStub(channel), metadata)
    except (CliError, OSError) as e:
        print(f"loramux {what}: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"loramux {what}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def _metadata(token_file: Path | None) -> list[tuple[str, str]]:
    if token_file is not None:
        token = token_file.read_text(encoding="utf-8").strip()
        if not token:
            raise CliError(f"--admin-token-file {token_file} is empty")
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    return [("authorization", f"Bearer {token}")] if token else []


def _adapter_files(directory: Path) -> tuple[str, Path]:
    """The config text and the weights path of an adapter directory (the server checks the rest)."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CliError(f"no {CONFIG_FILE} in {directory}")
    text = config_path.read_text(encoding="utf-8")
    try:
        config = json.loads(text)
    except ValueError as e:
        raise CliError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CliError(f"{config_path} is not a JSON object")
    name = PEFT_WEIGHTS if "peft_type" in config else ADAPTERHUB_WEIGHTS
    weights = directory / name
    if not weights.is_file():
        pickles = [p for p in PICKLE_FILES if (directory / p).is_file()]
        if pickles:
            raise CliError(f"{pickles[0]} is a pickle file, which loramux never loads; save as safetensors ({name})")
        raise CliError(f"no {name} in {directory}")
    return text, weights


def _sha256_and_size(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _to_dict(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    # Every field, zeros too (pinned=false, rank=0), so scripts need no defaults.
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


_HEADER = f"{'ID':<24} {'TYPE':<10} {'RANK':>4} {'STATE':<7} {'PINNED':<6} {'SIZE':>10} {'SHA256':<12} TARGETS"


def _line(m: Any) -> str:
    from loramux.v1 import loramux_pb2 as pb

    state = pb.AdapterState.Name(m.state).removeprefix("ADAPTER_STATE_").lower()
    targets = ",".join(m.target_modules[:6]) + (f",... ({len(m.target_modules)})" if len(m.target_modules) > 6 else "")
    return (
        f"{m.adapter_id:<24} {m.adapter_type:<10} {m.rank:>4} {state:<7} {'yes' if m.pinned else 'no':<6} "
        f"{m.size_bytes:>10} {m.sha256[:12]:<12} {targets}"
    )


def _print_adapter(m: Any, as_json: bool) -> None:
    print(json.dumps(_to_dict(m), indent=2) if as_json else f"{_HEADER}\n{_line(m)}")
