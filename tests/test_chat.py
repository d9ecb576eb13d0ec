"""Chat messages (GenerateRequest.messages): the tokenizer's chat template with the generation prompt,
checked against transformers' own apply_chat_template; refused for a model without a template."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from harness import ServerThread
from test_generation import reference_greedy

from loramux.cli import main as cli_main
from loramux.v1 import loramux_pb2 as pb

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hé, what is 2+2?"}]


@pytest.fixture(scope="module")
def chat_server(chat_llama_dir: Path):  # noqa: ANN201
    with ServerThread(chat_llama_dir) as s:
        yield s


@pytest.fixture(scope="module")
def plain_server(tiny_llama_dir: Path):  # noqa: ANN201
    with ServerThread(tiny_llama_dir) as s:
        yield s


def templated_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return list(tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)["input_ids"])


def chat_request(**kw: object) -> pb.GenerateRequest:
    messages = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES]
    return pb.GenerateRequest(messages=messages, params=pb.SamplingParams(max_new_tokens=8, ignore_eos=True), **kw)


def test_messages_go_through_the_chat_template(chat_server, chat_llama_dir, reference_llama) -> None:
    want = templated_ids(chat_llama_dir)
    assert want[0] == 1  # the template's BOS is a special token, not its characters
    resp = chat_server.gen.Generate(chat_request())
    assert resp.prompt_tokens == len(want)
    assert list(resp.token_ids) == reference_greedy(reference_llama, want, 8)
    # The stream of the same request joins up to the same tokens.
    parts = list(chat_server.gen.GenerateStream(chat_request()))
    assert [t for p in parts for t in p.token_ids] == list(resp.token_ids)


def test_exactly_one_prompt_source(chat_server) -> None:
    for extra in ({"prompt": "x"}, {"prompt_token_ids": [5, 6]}):
        with pytest.raises(grpc.RpcError) as e:
            chat_server.gen.Generate(chat_request(**extra))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exactly one of prompt, prompt_token_ids and messages" in e.value.details()


def test_a_message_without_a_role_is_refused(chat_server) -> None:
    req = pb.GenerateRequest(messages=[pb.ChatMessage(content="hi")], params=pb.SamplingParams(max_new_tokens=2))
    with pytest.raises(grpc.RpcError) as e:
        chat_server.gen.Generate(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in e.value.details()


def test_a_model_without_a_chat_template_answers_invalid_argument(plain_server) -> None:
    with pytest.raises(grpc.RpcError) as e:
        plain_server.gen.Generate(chat_request())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no chat template" in e.value.details()
    # The server keeps serving plain prompts.
    assert plain_server.gen.Generate(pb.GenerateRequest(prompt="ok", params=pb.SamplingParams(max_new_tokens=2)))


def test_generate_chat_command(chat_server, chat_llama_dir, reference_llama, capsys) -> None:
    argv = ["generate", "--server", chat_server.address, "--chat", "--system", MESSAGES[0]["content"],
            "--prompt", MESSAGES[1]["content"], "--max-new-tokens", "6", "--json"]  # fmt: skip
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    want = templated_ids(chat_llama_dir)
    assert out["prompt_tokens"] == len(want)
    greedy = reference_greedy(reference_llama, want, 6)
    assert out["token_ids"] == greedy[: len(out["token_ids"])] and len(out["token_ids"]) >= 1
