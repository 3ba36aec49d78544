"""Test helpers shared across test modules (imported as ``helpers``; tests/ is on sys.path)."""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ANNOTATION = (
    '{"results": [{"Code": "PartnershipPatient", "Sub-code": "build trust", '
    '"Span": "I trust your judgement"}]}'
)
CORPUS = [
    ANNOTATION,
    '{"results": [{"Code": "SDOH", "Sub-code": "EconomicStability", "Span": "rent is late"}]}',
    '{"Code": "PartnershipProvider", "Sub-code": "connection", "Span": "happy to help"}',
    "system\nYou are a helpful assistant.\nuser\nassistant\n",
    "Annotate the message: Thank you doctor, I trust your judgement.\n\n\n",
]


def build_chatml_tokenizer(directory: str | Path | None = None):
    """A tiny byte-level BPE tokenizer with a ChatML chat template, trained here (no download).

    eos is ``<|im_end|>`` (the end-of-turn token, as in Qwen's instruct models), pad is
    ``<|endoftext|>``, there is no BOS. When `directory` is given the tokenizer is saved there
    with ``save_pretrained`` so it can be loaded back with AutoTokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer
