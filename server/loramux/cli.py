"""loramux serve | cluster | generate | upload | adapters | bench."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys

from loramux.config import ServerConfig, add_flags, from_args


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC server")
    add_flags(p, ServerConfig)  # every ServerConfig / EngineConfig field is a flag


def _config_from_args(a: argparse.Namespace) -> ServerConfig:
    return from_args(ServerConfig, a)


def _client_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text from a running server")
    g.add_argument("--server", default="localhost:50051")
    g.add_argument("--adapter", default="", help="adapter id (empty = base model)")
    g.add_argument("--prompt", required=True, help="the prompt (with --chat: the user message)")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    g.add_argument("--system", default=None, help="with --chat: a system message before the user message")
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
    for module in ("loramux.cluster.cli", "loramux.cli_admin", "loramux.bench.cli"):
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
    if a.chat:
        system = [pb.ChatMessage(role="system", content=a.system)] if a.system is not None else []
        messages = [*system, pb.ChatMessage(role="user", content=a.prompt)]
        req = pb.GenerateRequest(adapter_id=a.adapter, messages=messages, params=params)
    else:
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
