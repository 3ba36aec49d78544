"""`tabpo convert` against oracles it shares no code with.

- Weights: the tensors each stack reads back (safetensors' torch reader, ``mx.load``) equal
  the source's bit for bit, bf16 included; a ``--dtype`` cast equals torch's own ``.to()``.
- Adapters: the merged weight each library implies, computed here in float64 NumPy from the
  raw factors, PEFT ``W + (alpha / r) B A`` (alpha / sqrt r for rsLoRA) and mlx-lm
  ``W + scale * (a b)^T``, agrees across the conversion (1e-6); factors survive a round trip
  bit for bit; the result loads in the target library itself (``PeftModel.from_pretrained``,
  ``mlx_lm.load(..., adapter_path=...)``) and its log-probs match the source's (1e-4).
- Every bad input exits with code 2, one line naming the file or key, nothing written.

Tiny random models (tests/helpers.py), 2 blocks, float32 unless stated; adapters with
non-zero B (and a perturbed DoRA magnitude) so that a wrong scale or orientation shows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import build_tiny_model
from stacks import close, f64, mlx_logps, refused, tensors, torch_logps
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytest.importorskip("peft")

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import load as mlx_load  # noqa: E402
from safetensors import safe_open  # noqa: E402

from tabpo.cli.app import app  # noqa: E402
from tabpo.common.errors import TabpoError  # noqa: E402
from tabpo.models.convert import convert  # noqa: E402
from tabpo.models.families import inspect_model_dir  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 12.0  # scale 3, so a lost or doubled scale shows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(family, tie=False)``: a tiny model directory, built once per module."""
    built = {}

    def get(family="llama", tie=False):
        if (family, tie) not in built:
            where = tmp_path_factory.mktemp(f"{family}-{tie}")
            built[family, tie] = build_tiny_model(where, family, tie=tie)
        return built[family, tie]

    return get


# -- oracles -----------------------------------------------------------------------------------


def metadata(file):
    with safe_open(str(file), framework="pt") as f:
        return f.metadata()


def peft_merged(base, adapter):
    """module -> W + scale B A from PEFT's raw files (scale from adapter_config.json)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (np.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    w, t = tensors(base), tensors(adapter)
    out = {}
    for key in t:
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = t[key.replace("lora_A", "lora_B")]
            out[module] = f64(w[f"{module}.weight"]) + scale * f64(b) @ f64(t[key])
    return out


def mlx_merged(base, adapter):
    """module -> W + scale (a b)^T from mlx-lm's raw files: x W^T + s x a b."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_parameters"]["scale"]
    w, t = tensors(base), tensors(adapter)
    return {
        key.removesuffix(".lora_a"): f64(w[key.replace(".lora_a", ".weight")])
        + scale * (f64(t[key]) @ f64(t[key.replace("lora_a", "lora_b")])).T
        for key in t
        if key.endswith(".lora_a")
    }


def same_merged(got, want, what):
    """The same adapted modules, each merged weight within 1e-6."""
    assert sorted(got) == sorted(want), f"{what}: adapted modules differ"
    for module in want:
        close(got[module], want[module], f"{what} {module}", 1e-6)


# -- adapters made by each library itself ------------------------------------------------------


def peft_adapter(base, out, *, targets=TARGETS, seed=1, dtype=None, **config):
    config.setdefault("target_modules", targets)
    """peft's get_peft_model on ``base``, B ~ N(0, 0.1), DoRA magnitudes x (1 + N(0, 0.1))."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM", **config)
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out))
    return out


def mlx_adapter(base, out, *, keys, num_layers, scale=5.0, dora=False, seed=2):
    """mlx-lm's linear_to_lora_layers on ``base``, saved as mlx-lm's trainer saves it."""
    mx.random.seed(seed)
    model, _ = mlx_load(str(base), model_config=inspect_model_dir(base).mlx_overrides())
    model.freeze()
    params = {"rank": RANK, "scale": scale, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    trained = dict(tree_flatten(model.trainable_parameters()))
    for name, value in trained.items():
        if name.endswith(".lora_b"):
            trained[name] = 0.1 * mx.random.normal(value.shape)
        elif name.endswith(".m"):
            trained[name] = value * (1.0 + 0.1 * mx.random.normal(value.shape))
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), trained)
    config = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": params,
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


# -- full models -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,tie", [("llama", False), ("qwen2", False), ("qwen3", False), ("qwen2", True)]
)
def test_model_round_trip_is_bit_exact_and_verified(tiny, tmp_path, family, tie):
    """torch -> mlx -> torch: same tensors bit for bit (a tied head stays absent), mlx's
    config states rope_theta at the top level and tie_word_embeddings, and the mlx result
    loaded by plain ``mlx_lm.load`` (no overrides) scores like transformers on the source."""
    src = tiny(family, tie)
    first = convert(src, tmp_path / "mlx", to="mlx")
    back = convert(tmp_path / "mlx", tmp_path / "torch", to="torch")
    for outcome in (first, back):
        assert outcome.verification is not None and outcome.verification.max_diff < 1e-4
    want = tensors(src)
    for stage in ("mlx", "torch"):
        got = tensors(tmp_path / stage)
        assert sorted(got) == sorted(want), f"{stage}: tensor names differ"
        for name in want:
            assert torch.equal(got[name], want[name]), f"{stage}: {name} changed"
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    theta = json.loads((src / "config.json").read_text())["rope_parameters"]["rope_theta"]
    assert config["rope_theta"] == theta and config["tie_word_embeddings"] is tie
    assert metadata(tmp_path / "torch" / "model.safetensors") == {"format": "pt"}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "torch" / name).read_bytes() == (src / name).read_bytes()
    if family == "qwen2" and not tie:  # qwen2's default theta differs: needs the top-level key
        close(mlx_logps(tmp_path / "mlx"), torch_logps(src), "plain mlx_lm.load vs torch", 1e-4)


def test_bf16_round_trip_is_bit_exact(tiny, tmp_path):
    """bf16 weights (no NumPy dtype) come back with identical bits, and mlx reads bf16."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "bf16"
    shutil.copytree(tiny("qwen3"), src)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    model.save_pretrained(str(src))
    convert(src, tmp_path / "mlx", to="mlx")
    convert(tmp_path / "mlx", tmp_path / "torch", to="torch")
    want = tensors(src)
    assert mx.load(str(tmp_path / "mlx" / "model.safetensors"))["model.norm.weight"].dtype == (
        mx.bfloat16
    )
    for stage in ("mlx", "torch"):
        got = tensors(tmp_path / stage)
        for name in want:
            assert got[name].dtype == torch.bfloat16
            assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name


def test_rounding_matches_torch_on_edge_values():
    """Ties to even, overflow to inf, subnormals, signed zeros and NaN, bf16 and fp16."""
    from tabpo.models.tensors import from_float32

    bits = np.array(
        [
            0x3F808000,
            0x3F818000,
            0x3F80FFFF,
            0x7F7FFFFF,
            0x00000001,
            0x80000000,
            0x7F800000,
            0xFF800000,
            0x7FC00000,
            0x477FF000,
            0x33000001,
        ],
        np.uint32,
    )
    x = np.concatenate([bits.view(np.float32), np.random.default_rng(0).normal(0, 1e3, 64)])
    x = x.astype(np.float32)
    for code, dtype in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        got = np.frombuffer(from_float32(x, code).data, np.uint16)
        want = torch.from_numpy(x).to(dtype).view(torch.int16).numpy().view(np.uint16)
        nan = np.isnan(x)
        assert np.array_equal(got[~nan], want[~nan]), code
        assert np.isnan(
            torch.from_numpy(got.view(np.int16).copy()).view(dtype).float().numpy()[nan]
        ).all()


def test_a_weight_beyond_float16_is_refused_by_name():
    """65504 is float16's largest value: a weight of 1e5 would become inf, which a
    conversion refuses naming the tensor; the bare rounding gives inf, as torch does."""
    from tabpo.models.tensors import cast, from_float32

    big = np.array([1.0, -1e5, 3.0], dtype=np.float32)
    with pytest.raises(TabpoError, match=r"model.w: values up to 1e\+05 do not fit F16"):
        cast(from_float32(big, "F32"), "F16", name="model.w")
    assert np.isinf(np.frombuffer(from_float32(big, "F16").data, np.float16)[1])
    cast(from_float32(big, "F32"), "BF16", name="model.w")  # bf16 has float32's range


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_cast_rounds_like_torch(tiny, tmp_path, dtype):
    """--dtype rounds each float32 weight exactly as torch's ``.to(dtype)`` does; the
    verification then allows the documented looser tolerance."""
    src = tiny("llama")
    outcome = convert(src, tmp_path / "out", to="torch", dtype=dtype)
    assert outcome.verification.tolerance > 1e-4
    assert outcome.verification.max_diff <= outcome.verification.tolerance
    target = getattr(torch, dtype)
    got = tensors(tmp_path / "out")
    for name, value in tensors(src).items():
        assert torch.equal(got[name].view(torch.int16), value.to(target).view(torch.int16)), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype


def test_sharded_model_keeps_its_shards_and_index(tiny, tmp_path):
    """A 3-shard source gives model-0000i-of-00003.safetensors and an index that lists every
    tensor, readable by transformers (with the index) and mlx-lm (by glob), both verified."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(str(tiny("llama")), dtype=torch.float32)
    model.save_pretrained(str(src), max_shard_size="40KB")
    shutil.copy(tiny("llama") / "tokenizer.json", src)
    n = len(list(src.glob("model-*.safetensors")))
    assert n >= 2
    for stack in ("mlx", "torch"):
        convert(src, tmp_path / stack, to=stack)
        files = sorted(p.name for p in (tmp_path / stack).glob("model*.safetensors"))
        assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        index = json.loads((tmp_path / stack / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(tensors(src))
        assert (tmp_path / stack / "tokenizer.json").is_file()


def test_mlx_lm_written_model_round_trip(tiny, tmp_path):
    """The reverse direction from a directory mlx-lm itself wrote (mlx_lm.convert, bf16,
    its own config and sharding): mlx -> torch -> mlx, every tensor bit for bit."""
    from mlx_lm import convert as mlx_convert

    mlx_convert(str(tiny("qwen2", True)), str(tmp_path / "mlx"), dtype="bfloat16")
    there = convert(tmp_path / "mlx", tmp_path / "torch", to="torch")
    back = convert(tmp_path / "torch", tmp_path / "again", to="mlx")
    assert there.verification.max_diff < 1e-4 and back.verification.max_diff < 1e-4
    want = tensors(tmp_path / "mlx")
    for stage in ("torch", "again"):
        got = tensors(tmp_path / stage)
        assert sorted(got) == sorted(want), stage
        for name in want:
            assert got[name].dtype == torch.bfloat16
            assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name


def test_quantized_mlx_model_is_refused_or_dequantized(tiny, tmp_path):
    """An mlx-lm 4-bit model: refused with the way out named; with --dequantize every dense
    weight equals mx.dequantize of its packed form and transformers loads the result."""
    from mlx_lm import convert as mlx_convert

    mlx_dir = tmp_path / "mlx"
    convert(tiny("llama"), mlx_dir, to="mlx", verify_result=False)
    mlx_convert(str(mlx_dir), str(tmp_path / "q4"), quantize=True, q_group_size=32, q_bits=4)
    with pytest.raises(TabpoError, match=r"quantized MLX weights .*--dequantize"):
        convert(tmp_path / "q4", tmp_path / "out", to="torch")
    assert not (tmp_path / "out").exists()
    outcome = convert(tmp_path / "q4", tmp_path / "out", to="torch", dequantize=True)
    assert outcome.verification.max_diff < 1e-4
    packed, got = mx.load(str(tmp_path / "q4" / "model.safetensors")), tensors(tmp_path / "out")
    w = "model.layers.1.mlp.down_proj"
    want = mx.dequantize(
        packed[f"{w}.weight"], packed[f"{w}.scales"], packed[f"{w}.biases"], group_size=32, bits=4
    )
    assert np.array_equal(got[f"{w}.weight"].numpy(), np.array(want))
    assert "quantization" not in json.loads((tmp_path / "out" / "config.json").read_text())


# -- adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_peft_adapter_round_trip(tiny, tmp_path, family):
    """PEFT -> mlx-lm -> PEFT on all seven projections: the merged weights agree at every
    stage, mlx_lm.load(adapter_path=...) scores like peft, and the factors come back bit for
    bit with the same scale."""
    base = tiny(family)
    src = peft_adapter(base, tmp_path / "peft")
    convert(src, tmp_path / "mlx", to="mlx", base=base)
    back = convert(tmp_path / "mlx", tmp_path / "back", to="torch", base=base)
    assert back.verification.max_diff < 1e-4
    want = peft_merged(base, src)
    assert len(want) == 2 * 7
    same_merged(mlx_merged(base, tmp_path / "mlx"), want, "mlx-lm")
    same_merged(peft_merged(base, tmp_path / "back"), want, "PEFT again")
    original, again = tensors(src), tensors(tmp_path / "back")
    assert sorted(again) == sorted(original)
    assert all(torch.equal(again[k], original[k]) for k in original)
    if family == "llama":  # the real loader, no tabpo code, against peft on the source
        overrides = inspect_model_dir(base).mlx_overrides()
        got = mlx_logps(base, tmp_path / "mlx", overrides)
        want_lp, base_lp = torch_logps(base, src), torch_logps(base)
        close(got, want_lp, "mlx_lm.load(adapter) vs peft", 1e-4)
        assert np.abs(want_lp - base_lp).max() > 1e-2, "the adapter does nothing"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_mlx_lm_adapter_loads_in_peft(tiny, tmp_path, family):
    """An adapter made by mlx-lm's linear_to_lora_layers on the last block only (keys
    q_proj, down_proj, scale 5) becomes PEFT with r 4, lora_alpha 20, layers_to_transform
    [1]; PeftModel.from_pretrained scores like mlx-lm and the merged weights agree; back to
    mlx-lm, the factors and config return unchanged."""
    base = tiny(family)
    src = mlx_adapter(
        base, tmp_path / "mlx", keys=["self_attn.q_proj", "mlp.down_proj"], num_layers=1
    )
    outcome = convert(src, tmp_path / "peft", to="torch", base=base)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["layers_to_transform"]) == (4, 20.0, [1])
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj"]
    same_merged(peft_merged(base, tmp_path / "peft"), mlx_merged(base, src), "PEFT")
    got = torch_logps(base, tmp_path / "peft")
    close(got, mlx_logps(base, src, inspect_model_dir(base).mlx_overrides()), "peft vs mlx", 1e-4)
    assert outcome.verification.max_diff < 1e-4
    back = convert(tmp_path / "peft", tmp_path / "back", to="mlx", base=base)
    assert back.verification.max_diff < 1e-4
    again = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert again["num_layers"] == 1 and again["lora_parameters"]["scale"] == 5.0
    original, returned = tensors(src), tensors(tmp_path / "back")
    assert sorted(returned) == sorted(original)
    assert all(torch.equal(returned[k], original[k]) for k in original)


@pytest.mark.parametrize(
    "targets",
    [
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0]},
        {"target_modules": r"model\.layers\.0\.self_attn\.(q_proj|v_proj)"},
    ],
)
def test_rslora_scale_and_non_suffix_layers(tiny, tmp_path, targets):
    """rsLoRA: mlx scale = alpha / sqrt(r) = 6. PEFT on block 0 only (not a suffix; by
    layers_to_transform or by a regex): mlx-lm covers blocks 0-1 and block 1 is zero-filled,
    so it merges to W exactly; the function is unchanged (verified)."""
    base = tiny("llama")
    src = peft_adapter(base, tmp_path / "peft", use_rslora=True, **targets)
    outcome = convert(src, tmp_path / "mlx", to="mlx", base=base)
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == pytest.approx(ALPHA / 2.0)
    assert config["num_layers"] == 2
    assert any("zero-filled 2" in note for note in outcome.notes)
    got = mlx_merged(base, tmp_path / "mlx")
    w = tensors(base)
    for key in ("self_attn.q_proj", "self_attn.v_proj"):
        assert np.array_equal(got[f"model.layers.1.{key}"], f64(w[f"model.layers.1.{key}.weight"]))
    layer0 = {k: v for k, v in got.items() if ".layers.0." in k}
    same_merged(layer0, peft_merged(base, src), "block 0")


def test_dora_round_trip(tiny, tmp_path):
    """DoRA (same definition in both libraries) on block 0 of 2: PEFT -> mlx-lm -> PEFT
    keeps every magnitude vector bit for bit; block 1 is filled with B = 0 and m = ||W||_row
    (the identity); both directions verify."""
    base = tiny("qwen2")
    src = peft_adapter(
        base,
        tmp_path / "peft",
        targets=["q_proj", "up_proj"],
        use_dora=True,
        layers_to_transform=[0],
    )
    there = convert(src, tmp_path / "mlx", to="mlx", base=base)
    back = convert(tmp_path / "mlx", tmp_path / "back", to="torch", base=base)
    assert there.verification.max_diff < 1e-4 and back.verification.max_diff < 1e-4
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora" and config["num_layers"] == 2
    original, again, mid = tensors(src), tensors(tmp_path / "back"), tensors(tmp_path / "mlx")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert torch.equal(mid["model.layers.0.self_attn.q_proj.m"], original[key])
    assert all(torch.equal(again[k], original[k]) for k in original)
    w = f64(tensors(base)["model.layers.1.mlp.up_proj.weight"])
    close(f64(mid["model.layers.1.mlp.up_proj.m"]), np.linalg.norm(w, axis=1), "filled m", 1e-6)
    assert not mid["model.layers.1.mlp.up_proj.lora_b"].any()


def test_bf16_adapter_round_trip_is_bit_exact(tiny, tmp_path):
    base = tiny("llama")
    src = peft_adapter(base, tmp_path / "peft", targets=["q_proj", "o_proj"], dtype=torch.bfloat16)
    convert(src, tmp_path / "mlx", to="mlx", base=base)
    convert(tmp_path / "mlx", tmp_path / "back", to="torch", base=base)
    original, again = tensors(src), tensors(tmp_path / "back")
    assert all(v.dtype == torch.bfloat16 for v in original.values())
    assert all(
        torch.equal(again[k].view(torch.int16), original[k].view(torch.int16)) for k in original
    )


# -- bad input: one line, exit code 2, nothing written -------------------------------------------


def cli(*args):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def damaged(tiny, tmp_path, edit):
    """A copy of the llama model with ``edit(directory)`` applied."""
    directory = tmp_path / "damaged"
    shutil.copytree(tiny("llama"), directory)
    edit(directory)
    return directory


def edit_config(**changes):
    def edit(directory):
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


def rewrite(*, drop=None, add=None):
    """An edit that removes the tensor ``drop`` or adds a (2, 2) tensor ``add``."""

    def edit(directory):
        from safetensors.torch import save_file

        t = {k: v for k, v in tensors(directory).items() if k != drop}
        if add is not None:
            t[add] = torch.zeros(2, 2)
        save_file(t, str(directory / "model.safetensors"), metadata={"format": "pt"})

    return edit


def truncate(directory):
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


@pytest.mark.parametrize(
    "edit,needles",
    [
        (edit_config(model_type="gpt2"), ["model_type 'gpt2' is not supported"]),
        (lambda d: (d / "model.safetensors").unlink(), ["no model*.safetensors"]),
        (truncate, ["model.safetensors", "truncated"]),
        (
            edit_config(intermediate_size=48),
            ["mlp.gate_proj.weight has shape (64, 32)", "(48, 32)"],
        ),
        (edit_config(num_hidden_layers=3), ["model.layers.2.", "is missing"]),
        (edit_config(tie_word_embeddings=True), ["lm_head.weight differs"]),
        (rewrite(drop="lm_head.weight"), ["tie_word_embeddings is false but there is no lm_head"]),
        (rewrite(add="model.layers.0.mlp.extra.weight"), ["unexpected tensor model.layers.0.mlp"]),
        (
            lambda d: (d / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}})
            ),
            ["model-00002-of-00002.safetensors is listed but missing"],
        ),
    ],
)
def test_bad_model_is_refused(tiny, tmp_path, edit, needles):
    src = damaged(tiny, tmp_path, edit)
    refused(cli(src, tmp_path / "out", "--to", "mlx"), tmp_path / "out", *needles)


def test_bad_directories_and_destinations(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    refused(
        cli(tmp_path / "empty", tmp_path / "o", "--to", "mlx"),
        tmp_path / "o",
        "not a model directory",
    )
    refused(cli(tmp_path / "nowhere", tmp_path / "o", "--to", "mlx"), tmp_path / "o", "not found")
    refused(cli(tiny("llama"), tmp_path / "o", "--to", "onnx"), tmp_path / "o", "--to must be")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("x")
    result = cli(tiny("llama"), existing, "--to", "mlx")
    assert result.exit_code == 2 and "--force" in result.output
    assert [p.name for p in existing.iterdir()] == ["keep"]
    result = cli(tiny("llama"), existing, "--to", "mlx", "--force")
    assert result.exit_code == 0 and (existing / "model.safetensors").is_file()


def test_base_is_asked_for_only_where_it_is_needed(tiny, tmp_path):
    """PEFT -> mlx-lm needs the base's layer count whether verified or not, and says so
    without pointing at --no-verify; mlx-lm -> PEFT needs it only to verify, and
    --no-verify converts without it."""
    base = tiny("llama")
    peft = peft_adapter(base, tmp_path / "peft")
    for extra in ([], ["--no-verify"]):
        result = cli(peft, tmp_path / "to-mlx", "--to", "mlx", *extra)
        assert result.exit_code == 2 and "layer count" in result.output, result.output
        assert "--no-verify" not in result.output
    mlx = mlx_adapter(base, tmp_path / "mlx", keys=["self_attn.q_proj"], num_layers=1)
    result = cli(mlx, tmp_path / "to-peft", "--to", "torch")
    assert result.exit_code == 2 and "--no-verify converts without it" in result.output
    result = cli(mlx, tmp_path / "to-peft", "--to", "torch", "--no-verify")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "to-peft" / "adapter_model.safetensors").is_file()


def test_failed_verification_writes_nothing(tiny, tmp_path):
    """bf16 rounding moves log-probs by more than an impossible tolerance: exit 2, and the
    temporary directory is gone."""
    result = cli(
        tiny("llama"), tmp_path / "o", "--to", "mlx", "--dtype", "bfloat16", "--tolerance", "1e-9"
    )
    refused(result, tmp_path / "o", "verification failed", "tolerance 1e-09")


def test_bad_adapters_are_refused(tiny, tmp_path):
    base = tiny("llama")
    src = peft_adapter(base, tmp_path / "peft", targets=["q_proj"])
    dst = tmp_path / "o"
    refused(cli(src, dst, "--to", "mlx"), dst, "--base DIR")
    refused(cli(src, dst, "--to", "torch", "--base", base), dst, "already a PEFT adapter")
    short = tmp_path / "short"  # a one-block base: the adapter's block 1 is not there
    build_tiny_model(short, "llama", layers=1)
    refused(
        cli(src, dst, "--to", "mlx", "--base", short),
        dst,
        "the base has no model.layers.1.self_attn.q_proj.weight",
    )
    wrong = tmp_path / "wrong"  # A (r, 16) on a (32, 32) projection
    shutil.copytree(src, wrong)
    file = wrong / "adapter_model.safetensors"
    t = tensors(wrong)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(RANK, 16)
    from safetensors.torch import save_file

    save_file(t, str(file), metadata={"format": "pt"})
    refused(
        cli(wrong, dst, "--to", "mlx", "--base", base),
        dst,
        "q_proj.weight has shape (32, 32), the adapter's factors imply (32, 16)",
    )
    saved = peft_adapter(base, tmp_path / "saved", targets=["q_proj"], modules_to_save=["lm_head"])
    refused(cli(saved, dst, "--to", "mlx", "--base", base), dst, "modules_to_save")
    (tmp_path / "bare").mkdir()
    shutil.copy(src / "adapter_config.json", tmp_path / "bare")
    refused(cli(tmp_path / "bare", dst, "--to", "mlx"), dst, "missing adapter weights")
    full = mlx_adapter(base, tmp_path / "full", keys=["self_attn.q_proj"], num_layers=2)
    config = json.loads((full / "adapter_config.json").read_text())
    (full / "adapter_config.json").write_text(json.dumps({**config, "num_layers": 1}))
    refused(
        cli(full, dst, "--to", "torch", "--base", base),
        dst,
        "adapts block 0 but num_layers=1 covers only blocks 1..",
    )
    (full / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full"}))
    refused(cli(full, dst, "--to", "torch", "--base", base), dst, "not a LoRA adapter")


# -- CLI happy paths and import hygiene ------------------------------------------------------------


def test_cli_converts_both_ways_and_reports_the_difference(tiny, tmp_path):
    base = tiny("qwen3")
    for src, dst, extra in (
        (base, tmp_path / "mlx", ()),
        (tmp_path / "mlx", tmp_path / "torch", ()),
        (peft_adapter(base, tmp_path / "p", targets=["v_proj"]), tmp_path / "a", ("--base", base)),
    ):
        result = cli(src, dst, "--to", "torch" if dst.name == "torch" else "mlx", *extra)
        assert result.exit_code == 0, result.output
        assert "verified: max |Δ log-prob|" in result.output


def test_conversion_without_verification_needs_no_stack(tiny, tmp_path, monkeypatch):
    """Conversions without verification import neither torch nor mlx (so either stack alone,
    or none, suffices); with a stack missing, the default skips verification and says why,
    and an explicit --verify is refused."""
    src = peft_adapter(tiny("llama"), tmp_path / "peft", targets=["q_proj"])
    code = (
        "import sys; from pathlib import Path; from tabpo.models.convert import convert; "
        "a = [Path(p) for p in sys.argv[1:]]; "
        "convert(a[0], a[1] / 'm', to='mlx', verify_result=False); "
        "convert(a[2], a[1] / 'a', to='mlx', base=a[0], verify_result=False); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlx'}))"
    )
    args = [sys.executable, "-c", code, tiny("llama"), tmp_path, src]
    out = subprocess.run(list(map(str, args)), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    from tabpo.models import verify

    monkeypatch.setattr(verify, "missing_packages", lambda: ["mlx_lm"])
    outcome = convert(tiny("llama"), tmp_path / "skipped", to="mlx")
    assert outcome.verification is None
    assert outcome.unverified == "not verified: mlx_lm not installed"
    with pytest.raises(TabpoError, match="--verify needs both stacks: mlx_lm not installed"):
        convert(tiny("llama"), tmp_path / "refused", to="mlx", verify_result=True)
    assert not (tmp_path / "refused").exists()
