"""`tabpo merge` against oracles it shares no code with.

The merged weight of every adapted module is computed here in float64 NumPy from the raw
factor files:

    LoRA  W' = W + s B A                 PEFT: s = alpha / r; mlx-lm: s = scale, A = a^T, B = b^T
    DoRA  W' = m / ||W + s B A||_row * (W + s B A)

and compared with what was written (1e-6); every other tensor must be byte-identical. The
merged directory is then loaded by the plain target library (transformers without peft, or
``mlx_lm.load`` without overrides) and scored against base + adapter in the adapter's own
library (1e-4 in float32). Tiny random models, non-zero adapters.
"""

from __future__ import annotations

import json
import shutil

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

from tabpo.cli.app import app  # noqa: E402
from tabpo.models.families import inspect_model_dir  # noqa: E402
from tabpo.models.merge import merge  # noqa: E402

RANK, ALPHA = 4, 12.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    built = {}

    def get(family="llama"):
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp(family), family)
        return built[family]

    return get


def peft_adapter(base, out, *, targets, dora=False, seed=1):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    lora = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=targets,
        use_dora=dora,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return out


def mlx_adapter(base, out, *, keys, num_layers, scale=5.0, seed=2):
    mx.random.seed(seed)
    model, _ = mlx_load(str(base), model_config=inspect_model_dir(base).mlx_overrides())
    model.freeze()
    params = {"rank": RANK, "scale": scale, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, num_layers, params)
    trained = {
        k: (0.1 * mx.random.normal(v.shape) if k.endswith("lora_b") else v)
        for k, v in tree_flatten(model.trainable_parameters())
    }
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), trained)
    config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def expected_merge(base, adapter):
    """module -> merged weight (module docstring), from the raw files of either format."""
    w, t = tensors(base), tensors(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    out = {}
    if "lora_parameters" in config:  # mlx-lm: x W^T + s x a b
        scale = config["lora_parameters"]["scale"]
        for key in [k for k in t if k.endswith(".lora_a")]:
            module = key.removesuffix(".lora_a")
            delta = scale * (f64(t[key]) @ f64(t[f"{module}.lora_b"])).T
            out[module] = f64(w[f"{module}.weight"]) + delta
        return out
    scale = config["lora_alpha"] / config["r"]
    for key in [k for k in t if k.endswith(".lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        merged = f64(w[f"{module}.weight"]) + scale * f64(t[key.replace("_A", "_B")]) @ f64(t[key])
        magnitude = key.replace("lora_A.weight", "lora_magnitude_vector")
        if magnitude in t:
            merged *= f64(t[magnitude])[:, None] / np.linalg.norm(merged, axis=1, keepdims=True)
        out[module] = merged
    return out


def check_merged(base, adapter, merged):
    want, got, original = expected_merge(base, adapter), tensors(merged), tensors(base)
    assert sorted(got) == sorted(original)
    for name, value in original.items():
        module = name.removesuffix(".weight")
        if module in want:
            close(f64(got[name]), want[module], f"merged {module}", 1e-6)
        else:
            assert torch.equal(got[name], value), f"{name} changed but is not adapted"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_merge_peft_adapter_into_plain_models(tiny, tmp_path, family):
    """A PEFT adapter on all seven projections, merged for both stacks: merged weights by
    hand, plain transformers and plain mlx_lm.load (no overrides) score like peft."""
    base = tiny(family)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = peft_adapter(base, tmp_path / "peft", targets=targets)
    for to in ("torch", "mlx"):
        outcome = merge(adapter, tmp_path / to, base=base, to=to)
        assert outcome.verification.max_diff < 1e-4
        check_merged(base, adapter, tmp_path / to)
    want = torch_logps(base, adapter)
    assert np.abs(want - torch_logps(base)).max() > 1e-2, "the adapter does nothing"
    close(torch_logps(tmp_path / "torch"), want, "plain transformers vs peft", 1e-4)
    close(mlx_logps(tmp_path / "mlx"), want, "plain mlx-lm vs peft", 1e-4)


def test_merge_mlx_lm_adapter(tiny, tmp_path):
    """An adapter from mlx-lm's own linear_to_lora_layers (last block, scale 5) merged for
    transformers: merged weights by hand, plain transformers scores like mlx-lm + adapter."""
    base = tiny("qwen2")
    adapter = mlx_adapter(
        base, tmp_path / "mlx", keys=["self_attn.v_proj", "mlp.up_proj"], num_layers=1
    )
    outcome = merge(adapter, tmp_path / "torch", base=base, to="torch")
    assert outcome.verification.max_diff < 1e-4
    check_merged(base, adapter, tmp_path / "torch")
    overrides = inspect_model_dir(base).mlx_overrides()
    close(torch_logps(tmp_path / "torch"), mlx_logps(base, adapter, overrides), "vs mlx", 1e-4)


def test_merge_dora_adapter(tiny, tmp_path):
    """DoRA: rows rescaled to the learned magnitude; equals peft's own merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny("llama")
    adapter = peft_adapter(base, tmp_path / "peft", targets=["q_proj", "down_proj"], dora=True)
    merge(adapter, tmp_path / "mlx", base=base, to="mlx")
    check_merged(base, adapter, tmp_path / "mlx")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_own = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    got = tensors(tmp_path / "mlx")
    name = "model.layers.1.mlp.down_proj.weight"
    close(f64(got[name]), f64(peft_own[name]), "vs peft merge_and_unload", 1e-6)


def test_merge_into_bf16_rounds_once(tiny, tmp_path):
    """--dtype bfloat16: the merged weight is the float64 merge rounded once to bf16, and
    the verification uses the bf16 tolerance."""
    base = tiny("llama")
    adapter = peft_adapter(base, tmp_path / "peft", targets=["o_proj"])
    outcome = merge(adapter, tmp_path / "out", base=base, to="torch", dtype="bfloat16")
    assert outcome.verification.tolerance == pytest.approx(0.1)
    got = tensors(tmp_path / "out")
    name = "model.layers.0.self_attn.o_proj"
    want = torch.from_numpy(expected_merge(base, adapter)[name]).float().to(torch.bfloat16)
    assert torch.equal(got[f"{name}.weight"].view(torch.int16), want.view(torch.int16))


def cli(*args):
    return CliRunner().invoke(app, ["merge", *map(str, args)])


def test_cli_merge_and_bad_inputs(tiny, tmp_path):
    base = tiny("qwen3")
    adapter = peft_adapter(base, tmp_path / "peft", targets=["q_proj"])
    dst = tmp_path / "out"
    short = build_tiny_model(tmp_path / "short", "qwen3", layers=1)
    refused(
        cli(adapter, dst, "--base", short, "--to", "torch"),
        dst,
        "the base has no model.layers.1.self_attn.q_proj.weight",
    )
    refused(cli(base, dst, "--base", base, "--to", "torch"), dst, "not a LoRA adapter")
    refused(cli(adapter, dst, "--base", base, "--to", "torch", "--dtype", "int8"), dst, "--dtype")
    bf16 = ["--dtype", "bfloat16", "--tolerance", "1e-9"]
    refused(cli(adapter, dst, "--base", base, "--to", "mlx", *bf16), dst, "verification failed")
    for to in ("torch", "mlx"):
        result = cli(adapter, tmp_path / to, "--base", base, "--to", to)
        assert result.exit_code == 0, result.output
        assert "merged" in result.output and "verified: max |Δ log-prob|" in result.output
    shutil.copytree(tmp_path / "mlx", dst)
    result = cli(adapter, dst, "--base", base, "--to", "torch")
    assert result.exit_code == 2 and "--force" in result.output
