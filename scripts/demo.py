"""`make demo`: start loramux on the demo model, generate with and without adapters, stop it.

Two small demo LoRA adapters (fixed seeds) are written into a temporary store in
PEFT's on-disk format, so the same prompt gives three different outputs (base
model, adapter 1, adapter 2), all computed in the same batches.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save_file

from loramux.model import demo_config
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc


def write_demo_lora(root: Path, adapter_id: str, seed: int, rank: int = 8) -> None:
    """A PEFT-format LoRA on q/v of every layer of the demo model, with random weights."""
    cfg = demo_config()
    hidden = cfg.hidden_size
    kv = cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg.num_hidden_layers):
        for name, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.3
    d = root / adapter_id
    d.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
    }
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(d / "adapter_model.safetensors"))


def start_server(store: Path) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "loramux.cli", "serve", "--port", "0", "--metrics-port", "0", "--http-port", "0",
           "--store", str(store)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    grpc_addr = metrics_addr = ""
    deadline = time.monotonic() + 300
    while not (grpc_addr and metrics_addr):
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            raise SystemExit(f"server did not start (exit code {proc.poll()})")
        if line.startswith("grpc listening on "):
            grpc_addr = line.split()[-1]
        elif line.startswith("metrics listening on "):
            metrics_addr = line.split()[-1]
    return proc, grpc_addr, metrics_addr


def wait_serving(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(600):
        try:
            if stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise SystemExit("server never became SERVING")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="loramux-demo-") as tmp:
        store = Path(tmp)
        write_demo_lora(store, "demo-lora-a", seed=1)
        write_demo_lora(store, "demo-lora-b", seed=2)
        proc, grpc_addr, metrics_addr = start_server(store)
        print(f"server up: grpc {grpc_addr}, metrics http://{metrics_addr.replace('0.0.0.0', '127.0.0.1')}/metrics")
        try:
            with grpc.insecure_channel(grpc_addr) as ch:
                wait_serving(ch)
                gen = pb_grpc.GenerationStub(ch)
                prompt = "Once upon a time"
                params = pb.SamplingParams(max_new_tokens=24, ignore_eos=True)
                print(f"\n== one prompt, three adapters, sent together: {prompt!r}")
                with ThreadPoolExecutor(3) as pool:
                    futs = {
                        a or "(base)": pool.submit(
                            gen.Generate, pb.GenerateRequest(adapter_id=a, prompt=prompt, params=params)
                        )
                        for a in ("", "demo-lora-a", "demo-lora-b")
                    }
                    outs = {k: f.result() for k, f in futs.items()}
                for name, r in outs.items():
                    print(f"{name:>12}: tokens {list(r.token_ids)[:12]}... text {r.text!r}")
                distinct = len({tuple(r.token_ids) for r in outs.values()})
                print(f"distinct outputs: {distinct} of 3 (the demo model has random weights, so the text is noise)")

                print("\n== streaming with demo-lora-a (token ids as they arrive):")
                for msg in gen.GenerateStream(
                    pb.GenerateRequest(adapter_id="demo-lora-a", prompt=prompt, params=params)
                ):
                    print(list(msg.token_ids), end=" ", flush=True)
                print(f"\nfinish: {pb.FinishReason.Name(msg.finish_reason)}, {msg.generated_tokens} tokens")

                url = f"http://{metrics_addr.replace('0.0.0.0', '127.0.0.1')}/metrics"
                text = urllib.request.urlopen(url, timeout=10).read().decode()
                print("\n== a few metrics:")
                for line in text.splitlines():
                    if line.startswith(("loramux_requests_total", "loramux_generated_tokens_total",
                                        "loramux_adapters_resident")):
                        print("  " + line)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            print(f"\nserver stopped (exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
