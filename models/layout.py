"""The tensors a model of a supported family must hold, with their shapes, from config.json.

Both stacks name these tensors alike (models/families.py), so one table checks a directory
before anything is written: a config that does not describe its weights (a missing layer, a
wrong head count, a shard from another model) is named here, not by a loader's traceback.
"""

from __future__ import annotations

from typing import Any

from tabpo.common.errors import TabpoError

# tensors some checkpoints carry that neither stack reads (mlx-lm's sanitize drops them)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int):
        raise TabpoError(f"config.json: {key} is missing or not an integer ({value!r})")
    return value


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of an untied llama / mistral / qwen2 / qwen3 model
    (``lm_head.weight`` included: the caller drops it when embeddings are tied)."""
    family = config.get("model_type")
    hidden, inter = _int(config, "hidden_size"), _int(config, "intermediate_size")
    vocab, layers = _int(config, "vocab_size"), _int(config, "num_hidden_layers")
    heads = _int(config, "num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    attention_bias = bool(config.get("attention_bias", False))
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    block = {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, q),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    if family == "qwen2" or attention_bias:
        block.update(
            {
                "self_attn.q_proj.bias": (q,),
                "self_attn.k_proj.bias": (kv,),
                "self_attn.v_proj.bias": (kv,),
            }
        )
    if attention_bias and family != "qwen2":
        block["self_attn.o_proj.bias"] = (hidden,)
    if config.get("mlp_bias"):
        block["mlp.gate_proj.bias"] = block["mlp.up_proj.bias"] = (inter,)
        block["mlp.down_proj.bias"] = (hidden,)
    if family == "qwen3":
        block.update(
            {"self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,)}
        )
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in block.items()})
    return shapes


def check_layout(
    found: dict[str, tuple[int, ...]], config: dict[str, Any], *, tied: bool, where: str
) -> None:
    """A TabpoError naming the first missing, unexpected or misshapen tensor."""
    want = expected_shapes(config)
    if tied:
        del want["lm_head.weight"]
        found = {k: v for k, v in found.items() if k != "lm_head.weight"}
    elif "lm_head.weight" not in found:
        raise TabpoError(
            f"{where}: config.json says tie_word_embeddings is false but there is no lm_head.weight"
        )
    for name in sorted(set(want) - set(found)):
        raise TabpoError(f"{where}: tensor {name} is missing (config.json expects it)")
    for name in sorted(set(found) - set(want)):
        raise TabpoError(f"{where}: unexpected tensor {name} (not part of this config's model)")
    for name, shape in want.items():
        if tuple(found[name]) != shape:
            raise TabpoError(
                f"{where}: tensor {name} has shape {tuple(found[name])}, config.json "
                f"implies {shape}"
            )
