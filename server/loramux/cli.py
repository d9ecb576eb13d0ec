"""loramux serve | generate | upload | adapters | bench."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from pathlib import Path

from loramux.config import EngineConfig, ServerConfig


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC server")
    d = ServerConfig()
    e = EngineConfig()
    p.add_argument("--model", default=d.model, help="a local Hugging Face model directory, or 'demo'")
    p.add_argument("--store", type=Path, default=d.store, help="adapter store directory")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (0 = pick a free one)")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port, help="Prometheus port (0 = pick a free one)")
    p.add_argument("--metrics-host", default=d.metrics_host, help="metrics bind address (default: --host)")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--admin-token-file", type=Path, default=None)
    p.add_argument("--tls-cert", type=Path, default=None)
    p.add_argument("--tls-key", type=Path, default=None)
    p.add_argument("--max-adapter-mb", type=float, default=d.max_adapter_mb)
    p.add_argument("--max-message-mb", type=int, default=d.max_message_mb)
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    p.add_argument("--log-format", default=d.log_format, choices=["text", "json"])
    p.add_argument("--log-prompts", action="store_true", help="include prompt text in request logs")
    p.add_argument("--metrics-max-adapter-labels", type=int, default=d.metrics_max_adapter_labels)
    p.add_argument("--max-running", type=int, default=e.max_running)
    p.add_argument("--max-batch-tokens", type=int, default=e.max_batch_tokens)
    p.add_argument("--max-queue", type=int, default=e.max_queue)
    p.add_argument("--max-model-len", type=int, default=e.max_model_len)
    p.add_argument("--default-max-new-tokens", type=int, default=e.default_max_new_tokens)
    p.add_argument("--max-device-adapters", type=int, default=e.max_device_adapters)
    p.add_argument("--host-cache-mb", type=float, default=e.host_cache_mb)
    p.add_argument("--merged-cache-mb", type=float, default=e.merged_cache_mb)
    p.add_argument("--merge-threshold", type=float, default=e.merge_threshold)
    p.add_argument("--merge-window-tokens", type=int, default=e.merge_window_tokens)


def _config_from_args(a: argparse.Namespace) -> ServerConfig:
    engine = EngineConfig(
        max_running=a.max_running,
        max_batch_tokens=a.max_batch_tokens,
        max_queue=a.max_queue,
        max_model_len=a.max_model_len,
        default_max_new_tokens=a.default_max_new_tokens,
        max_device_adapters=a.max_device_adapters,
        host_cache_mb=a.host_cache_mb,
        merged_cache_mb=a.merged_cache_mb,
        merge_threshold=a.merge_threshold,
        merge_window_tokens=a.merge_window_tokens,
    )
    return ServerConfig(
        model=a.model,
        store=a.store,
        host=a.host,
        port=a.port,
        metrics_port=a.metrics_port,
        metrics_host=a.metrics_host,
        device=a.device,
        dtype=a.dtype,
        admin_token_file=a.admin_token_file,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        max_adapter_mb=a.max_adapter_mb,
        max_message_mb=a.max_message_mb,
        drain_timeout=a.drain_timeout,
        log_format=a.log_format,
        log_prompts=a.log_prompts,
        metrics_max_adapter_labels=a.metrics_max_adapter_labels,
        engine=engine,
    )


def _client_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text from a running server")
    g.add_argument("--server", default="localhost:50051")
    g.add_argument("--adapter", default="", help="adapter id (empty = base model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--stream", action="store_true")
    g.add_argument("--json", action="store_true", help="print the response as JSON (contract field names)")
    g.add_argument("--timeout", type=float, default=300.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loramux", description="multi-adapter LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _client_parsers(sub)
    for module in ("loramux.cli_admin", "loramux.bench.cli"):
        try:
            mod = importlib.import_module(module)
        except ImportError:  # optional command groups (registry, bench) not installed
            continue
        (getattr(mod, "add_parsers", None) or mod.add_admin_parsers)(sub)
    a = parser.parse_args(argv)
    if a.command == "serve":
        return _serve(a)
    if a.command == "generate":
        return _generate(a)
    return a.func(a)


def _serve(a: argparse.Namespace) -> int:
    from loramux.api.server import serve

    try:
        config = _config_from_args(a)
        config.validate()
    except ValueError as e:
        print(f"loramux serve: {e}", file=sys.stderr)
        return 2
    _setup_logging(config)
    return asyncio.run(serve(config))


def _setup_logging(config: ServerConfig) -> None:
    try:
        from loramux.logs import setup_logging
    except ImportError:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    setup_logging(config.log_format, log_prompts=config.log_prompts)


def _generate(a: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from loramux.v1 import loramux_pb2 as pb
    from loramux.v1 import loramux_pb2_grpc as pb_grpc

    params = pb.SamplingParams(
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, stop=a.stop
    )
    if a.seed is not None:
        params.seed = a.seed
    req = pb.GenerateRequest(adapter_id=a.adapter, prompt=a.prompt, params=params)
    with grpc.insecure_channel(a.server) as ch:
        stub = pb_grpc.GenerationStub(ch)
        try:
            if a.stream:
                for msg in stub.GenerateStream(req, timeout=a.timeout):
                    if a.json:
                        print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True)), flush=True)
                    else:
                        print(msg.text, end="", flush=True)
                if not a.json:
                    print()
            else:
                resp = stub.Generate(req, timeout=a.timeout)
                if a.json:
                    print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True)))
                else:
                    print(resp.text)
        except grpc.RpcError as e:
            print(f"loramux generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
