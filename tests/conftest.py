"""Fixtures shared by the whole suite: one real Redis per session, one key namespace per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from conspo.keys import Keys
from conspo.redis_conn import reachable_or_local
from conspo.testing import delete_run

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "math"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """$CONSPO_REDIS_URL if it answers, else a private redis-server for the session."""
    with reachable_or_local(os.environ.get("CONSPO_REDIS_URL")) as url:
        os.environ["CONSPO_REDIS_URL"] = url
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def run_name(redis_client: redis.Redis) -> Iterator[str]:
    """A fresh run namespace per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield name
    delete_run(redis_client, name)


@pytest.fixture
def keys(run_name: str) -> Keys:
    return Keys(run=run_name)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


# A model folder as a new user makes one (docs/byo-model.md): a byte-level BPE trained locally
# with `tokenizers`, a Qwen2-style chat template, a tiny random Qwen2, all via save_pretrained.
USER_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_user_model(out: Path, *, chat_template: bool = True, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Plain sentences: no answer phrases, so an untrained model has no shortcut to a reward.
    corpus = [
        f"Tom has {a} apples and buys {b} more, so he carries {a + b} of them home today."
        for a in range(40)
        for b in range(0, 40, 3)
    ]
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    if chat_template:
        tokenizer.chat_template = USER_CHAT_TEMPLATE
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def user_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny user-made model folder (byte-level BPE + chat template + random Qwen2)."""
    return build_user_model(tmp_path_factory.mktemp("user-model") / "model")
