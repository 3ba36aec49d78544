"""Oracles shared by the conversion and merge tests: each side scored in its own library.

Imported only by test modules that already skip without torch, mlx, mlx-lm and peft.
"""

from __future__ import annotations

import numpy as np

IDS = np.random.default_rng(7).integers(0, 400, size=(2, 24))  # seeded token sequences


def tensors(path):
    """Every tensor of a directory's model*/adapter*.safetensors files, via torch (bf16 ok)."""
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def f64(t):
    return t.double().numpy()


def close(got, want, what, atol):
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    assert diff.max() <= atol, f"{what}: max diff {diff.max():.3g}, mean {diff.mean():.3g}"


def log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def torch_logps(model_dir, adapter=None):
    """float64 log-softmax of transformers' (+ peft's) float32 logits on ``IDS``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return log_softmax(model.eval()(torch.from_numpy(IDS)).logits.numpy())


def mlx_logps(model_dir, adapter=None, overrides=None):
    """The same from mlx-lm's own loader (+ adapter_path, + model_config overrides)."""
    import mlx.core as mx
    from mlx_lm.utils import load

    model, _ = load(str(model_dir), adapter_path=adapter and str(adapter), model_config=overrides)
    model.set_dtype(mx.float32)
    return log_softmax(np.array(model(mx.array(IDS))))


def refused(result, dst, *needles):
    """A CLI result that failed as bad input should: exit code 2, one ``error:`` line last
    (a library's progress bar may precede it when the library was imported earlier), every
    needle in the output, and nothing written at ``dst`` (no temporary directory either)."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}.tmp-*"))
