"""Character-level tokenizer for the tiny models of the embedded demo.

Why character level: the synthetic task is arithmetic, where a sub-word vocabulary would merge
digits unpredictably ("12" one token, "13" two) and make the task harder to learn for a model of
half a million parameters. One token per character also keeps the vocabulary under 128 entries.

Why the `tokenizers` library and `PreTrainedTokenizerFast`: the rest of the project must treat
the tiny model exactly like a real one (Qwen2.5-Math from a local path): `save_pretrained`,
`AutoTokenizer.from_pretrained`, `apply_chat_template`, `decode(skip_special_tokens=True)`. Nothing
is downloaded; the vocabulary is built here from printable ASCII.

Design choices:
- The vocabulary is every printable ASCII character plus newline and tab (so any task text and
  the chat template fit), the special tokens `<pad>`, `<bos>`, `<eos>` and `<unk>` for anything
  else. Ids are stable: specials first (pad=0, bos=1, eos=2, unk=3), then characters in code-point
  order.
- The model is a `WordLevel` over single characters, with a pre-tokenizer that splits the input
  into characters (`Split` on the regex `[\\s\\S]`, which unlike `.` also matches newlines) and a
  `Fuse` decoder so that decoding concatenates characters without inserted spaces.
- A post-processor prepends `<bos>` to every encoded text (`add_special_tokens=True`, the
  default), and the chat template renders `<bos>` itself; `apply_chat_template` tokenizes with
  `add_special_tokens=False`, so both routes give the same ids. For a single user message the
  template renders the bare content, so `tokenizer("12+34=")` and
  `apply_chat_template([{"role": "user", "content": "12+34="}], add_generation_prompt=True)`
  produce identical ids: the warm-started model answers whichever route the generator takes.
  The generation prompt is empty: the model answers right after the prompt text, and an
  assistant turn ends with `<eos>`.
"""

from __future__ import annotations

import logging
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

#: Printable ASCII (space through tilde) plus newline and tab, in code-point order.
CHARACTERS: tuple[str, ...] = tuple(
    sorted({c for c in string.printable if c not in "\r\x0b\x0c"}, key=ord)
)

#: System messages end with a newline; user content is rendered bare; assistant turns end with
#: EOS. The generation prompt is empty (the model answers right after the prompt text).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
)


def build_vocab() -> dict[str, int]:
    """Token -> id: special tokens first, then the characters in code-point order."""
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    return {tok: i for i, tok in enumerate(tokens)}


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer (deterministic: same ids on every call)."""
    vocab = build_vocab()
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
