from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from loramux.config import LORA_PATHS  # noqa: E402
from loramux.model import build_from_config, byte_tokenizer, tiny_llama_config  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-requests",
        type=int,
        default=24,
        help="requests each client thread of tests/test_soak.py sends (default 24)",
    )
    what = "run every forward on this LoRA path: in-thread forwards and the servers tests start"
    parser.addoption("--lora-path", default=None, choices=LORA_PATHS, help=what)


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--lora-path")
    if path is not None:
        import harness

        harness.LORA_PATH = path


@pytest.fixture(autouse=True)
def _forced_lora_path(request: pytest.FixtureRequest):  # noqa: ANN202
    """With --lora-path, this test's own forwards (mixed_logits and the like) take that path too."""
    path = request.config.getoption("--lora-path")
    if path is None:
        yield
        return
    from loramux.adapters.kinds import lora_batched

    with lora_batched.force(path):
        yield


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved as a real model directory (config, safetensors, tokenizer)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    build_from_config(tiny_llama_config(), seed=0).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def chat_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a chat template in its tokenizer (saved and loaded the real way)."""
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat-llama")
    shutil.copytree(tiny_llama_dir, d, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def reference_llama(tiny_llama_dir: Path):  # noqa: ANN201
    """The same tiny Llama, for plain transformers generation."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True).eval()
    m.config = copy.deepcopy(m.config)
    return m


@pytest.fixture(scope="session")
def made(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The registry tests' adapters (PEFT LoRAs made once): two for the tiny Llama, one for a wider one."""
    from registry_helpers import make_adapters

    return make_adapters(tmp_path_factory.mktemp("made"))
