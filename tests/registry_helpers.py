"""Shared pieces of the registry tests: PEFT-made adapters, a server with an admin token, raw uploads."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from harness import ServerThread
from peft import LoraConfig
from peft_helpers import make_peft_adapter

from loramux.model import tiny_llama_config
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

TOKEN = "s3cret-admin-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
MAX_MB = 0.25
PROMPT = [b + 3 for b in b"registry"]
Code = grpc.StatusCode
SERVER_DIR = Path(__file__).resolve().parents[1] / "server"


class Adapter:
    """An adapter directory made by PEFT, its raw upload parts, and the PEFT model as the oracle."""

    def __init__(self, path: Path, model: torch.nn.Module) -> None:
        self.path, self.model = path, model
        self.config = (path / "adapter_config.json").read_text()
        self.weights = (path / "adapter_model.safetensors").read_bytes()
        self.sha256 = hashlib.sha256(self.weights).hexdigest()

    def greedy(self, n: int, ids: list[int] = PROMPT) -> list[int]:
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        return out[0, len(ids) :].tolist()


def make_adapters(root: Path) -> dict[str, Adapter]:
    """Two LoRAs for the tiny Llama ("a", "b") and one for a wider Llama ("other-base")."""
    out = {}
    for name, seed in (("a", 11), ("b", 12)):
        out[name] = Adapter(root / name, make_peft_adapter(tiny_llama_config(), LORA, root / name, seed=seed))
    other = root / "other-base"
    out["other-base"] = Adapter(other, make_peft_adapter(tiny_llama_config(hidden_size=96), LORA, other, seed=13))
    return out


class Running:
    """The module's server; test_restart swaps in a new one on the same store."""

    def __init__(self, model: Path, store: Path, token_file: Path) -> None:
        self.model, self.store, self.token_file = model, store, token_file
        self.s = self.start()

    def start(self) -> ServerThread:
        return ServerThread(
            self.model, store=self.store, admin_token_file=self.token_file, max_adapter_mb=MAX_MB, max_device_adapters=2
        )


def running_server(model: Path, root: Path) -> Iterator[Running]:
    """For a module fixture: a server on `root/store` whose admin token is TOKEN."""
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    running = Running(model, root / "store", token_file)
    yield running
    running.s.stop()


def upload(stub: pb_grpc.AdaptersStub, adapter_id: str, config: str, data: bytes, *, sha: str | None = None,
           size: int | None = None, overwrite: bool = False, metadata: list | None = AUTH, chunk: int = 1024,
           timeout: float = 60) -> pb.Adapter:  # fmt: skip
    manifest = pb.AdapterManifest(
        adapter_id=adapter_id, config_json=config, weights_sha256=sha or hashlib.sha256(data).hexdigest(),
        weights_size=len(data) if size is None else size, overwrite=overwrite,
    )  # fmt: skip
    msgs = [pb.UploadAdapterRequest(manifest=manifest)]
    msgs += [pb.UploadAdapterRequest(chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)]
    return stub.UploadAdapter(iter(msgs), metadata=metadata, timeout=timeout)


def put(srv: Running, adapter_id: str, a: Adapter, **kw: object) -> pb.Adapter:
    return upload(srv.s.adapters, adapter_id, a.config, a.weights, **kw)


def generate(srv: Running, adapter_id: str, n: int = 8) -> list[int]:
    req = pb.GenerateRequest(
        adapter_id=adapter_id, prompt_token_ids=PROMPT, params=pb.SamplingParams(max_new_tokens=n, ignore_eos=True)
    )
    return list(srv.s.gen.Generate(req, timeout=120).token_ids)


def code_of(fn, *args, **kw) -> grpc.StatusCode:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value.code()


def listed(srv: Running) -> list[str]:
    return [m.adapter_id for m in srv.s.adapters.ListAdapters(pb.ListAdaptersRequest(page_size=1000)).adapters]


def assert_store_clean(store: Path) -> None:
    """Nothing but adapter directories, plus the store's own (empty) dot-dirs."""
    deadline = time.monotonic() + 10  # an aborted upload's cleanup runs in a thread
    while True:
        leftovers = [p for d in store.iterdir() if d.name.startswith(".") for p in d.iterdir()]
        if not leftovers or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leftovers
    for d in store.iterdir():
        if not d.name.startswith("."):
            assert d.is_dir() and (d / "adapter_config.json").is_file() and (d / "loramux_manifest.json").is_file()


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        from cryptography import x509  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("TLS test needs the cryptography package or the openssl command")
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        return cert, key
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    pk = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pk.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        .sign(pk, hashes.SHA256())
    )
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key
