"""`tabpo train` end to end on both backends: outputs, cache, accumulation, resume, NaNs.

Tiny random models and data built by the tests; float32; LoRA dropout 0 where exact equality
across batch shapes is asserted (dropout masks depend on the shapes), kept on for resume.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import adam_close, build_tiny_model, write_pairs

from tabpo.backends import get_backend
from tabpo.common.errors import TabpoError
from tabpo.common.files import OutputDir
from tabpo.data.batching import collate
from tabpo.data.encoding import encode_pairs, load_tokenizer, pad_id
from tabpo.data.records import read_preferences
from tabpo.training import config as cfg
from tabpo.training.loop import Callbacks, NonFiniteLoss, train

BACKENDS = ["torch", "mlx"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write_pairs(root / "train.jsonl", 8), write_pairs(root / "eval.jsonl", 3, seed=1)


def config(model_dir, data, tmp_path, **overrides):
    values = {"model": str(model_dir), "data": str(data[0]), "output": str(tmp_path / "out"),
              "max_steps": 3, "learning_rate": 1e-2, "warmup_ratio": 0.0, "batch_size": 2,
              "gradient_accumulation_steps": 1, "ref_cache_dir": str(tmp_path / "cache"),
              "lora_rank": 4, "lora_alpha": 8.0, **overrides}  # fmt: skip
    return cfg.build({}, values)


def losses_of(output, key="loss"):
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in lines if key in r]


class StopAt(Callbacks):
    """Asks for a stop after step ``n`` (what Ctrl-C does in the CLI)."""

    def __init__(self, n: int) -> None:
        self.n, self.step = n, 0

    def log(self, record):
        self.step = record.get("step", self.step)

    def should_stop(self) -> bool:
        return self.step >= self.n


def close(a, b, tol, what):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = np.abs(a - b)
    assert np.allclose(a, b, rtol=tol, atol=tol), (
        f"{what}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g} (tol {tol})"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_metrics_checkpoints(backend, model_dir, data, tmp_path):
    c = config(model_dir, data, tmp_path, backend=backend, eval_data=str(data[1]),
               max_steps=4, save_steps=2, eval_steps=2)  # fmt: skip
    run = train(c, get_backend(backend))
    out = tmp_path / "out"
    assert run.state.step == 4
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    needed = {"loss", "grad_norm", "learning_rate", "num_tokens", "rewards/chosen",
              "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "loss/pref", "loss/barrier", "barrier/active_frac",
              "policy/prob_chosen", "pref/p", "delta/min", "delta/mean", "delta/max", "it/s",
              "tok/s", "peak_rss_gb", "epoch"}  # fmt: skip
    assert needed <= set(train_records[0]), needed - set(train_records[0])
    assert [r["num_tokens"] for r in train_records] == sorted(r["num_tokens"] for r in
                                                              train_records)  # fmt: skip
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"eval_rewards/accuracies", "eval_loss/barrier"} <= set(evals[0])
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "checkpoint-4" / "config.yaml").is_file()
    assert not [p for p in out.iterdir() if ".tmp" in p.name or ".old-" in p.name]  # temporaries
    adapter = "adapter_model.safetensors" if backend == "torch" else "adapters.safetensors"
    assert (out / adapter).is_file() and (out / "adapter_config.json").is_file()
    # the final set is one directory reached through one link; the top-level names follow it
    assert (out / "final").resolve() == (out / ".final-4").resolve()
    assert (out / adapter).resolve() == (out / ".final-4" / adapter).resolve()


@pytest.mark.parametrize("backend", BACKENDS)
def test_precomputed_reference_gives_the_same_losses(backend, model_dir, data, tmp_path):
    with_cache = config(model_dir, data, tmp_path / "a", backend=backend, precompute_ref=True)
    without = config(model_dir, data, tmp_path / "b", backend=backend, precompute_ref=False)
    train(with_cache, get_backend(backend))
    train(without, get_backend(backend))
    a, b = losses_of(tmp_path / "a" / "out"), losses_of(tmp_path / "b" / "out")
    assert len(a) == 3
    close(a, b, 1e-6, f"{backend} losses with vs without the reference cache")
    cached = list((tmp_path / "a" / "cache").rglob("*.safetensors"))
    assert len(cached) == 1  # one shard of one reference
    # a second run hits the cache: corrupt its values and the losses must change
    train(config(model_dir, data, tmp_path / "c", backend=backend, precompute_ref=True,
                 ref_cache_dir=str(tmp_path / "a" / "cache")), get_backend(backend))  # fmt: skip
    close(losses_of(tmp_path / "c" / "out"), a, 1e-6, "cache hit")


def test_reference_cache_survives_deleting_a_skipped_line(model_dir, data, tmp_path):
    """A line that encoding skips (its completion does not fit) is deleted from the file:
    every later pair's index shifts while the kept pairs' token ids stay the same. The
    cache must still give each pair its own reference: the same losses as without a cache
    (keyed by position, it handed pairs their neighbours' values or failed)."""
    lines = data[0].read_text().splitlines(keepends=True)
    long = json.dumps({"prompt": "p", "chosen": "x " * 3000, "rejected": "y " * 3000}) + "\n"
    (tmp_path / "with.jsonl").write_text(lines[0] + long + "".join(lines[1:]))
    (tmp_path / "without.jsonl").write_text("".join(lines))
    runs = {"a": ("with.jsonl", "cache"), "b": ("without.jsonl", "cache"),
            "c": ("without.jsonl", "fresh")}  # fmt: skip
    for run, (file, cache) in runs.items():
        c = config(model_dir, (tmp_path / file,), tmp_path / run, backend="torch",
                   ref_cache_dir=str(tmp_path / cache))  # fmt: skip
        train(c, get_backend("torch"))
    close(losses_of(tmp_path / "b" / "out"), losses_of(tmp_path / "c" / "out"), 1e-6,
          "losses with the shifted data set's cache vs a fresh one")  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulation_equals_one_big_batch(backend, model_dir, data, tmp_path):
    """4 pairs a step as 1 x 4, 2 x 2 and 4 x 1: the same losses and weights (dropout 0)."""
    results = []
    for i, (bs, acc) in enumerate([(4, 1), (2, 2), (1, 4)]):
        c = config(model_dir, data, tmp_path / str(i), backend=backend, batch_size=bs,
                   gradient_accumulation_steps=acc, lora_dropout=0.0, loss="dpo")  # fmt: skip
        run = train(c, get_backend(backend))
        results.append((losses_of(tmp_path / str(i) / "out"), run.backend.trainable_state()))
    base_losses, base_state = results[0]
    for losses, state in results[1:]:
        close(losses, base_losses, 1e-6, f"{backend} accumulated losses")
        for k in base_state:
            adam_close(state[k], base_state[k], lr=1e-2, steps=3, what=f"{backend} weights {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_reproduces_uninterrupted_run(backend, model_dir, data, tmp_path):
    """2N straight vs N, stop (Ctrl-C's path), resume, N: same losses; LoRA dropout on."""
    straight = config(model_dir, data, tmp_path / "a", backend=backend, max_steps=4,
                      lora_dropout=0.1)  # fmt: skip
    train(straight, get_backend(backend))
    first = config(model_dir, data, tmp_path / "b", backend=backend, max_steps=4,
                   lora_dropout=0.1)  # fmt: skip
    stopped = train(first, get_backend(backend), StopAt(2))
    assert stopped.state.step == 2
    out = tmp_path / "b" / "out"
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    resumed = cfg.build({}, {**first.to_dict(), "resume": str(out)})
    train(resumed, get_backend(backend))
    close(losses_of(out), losses_of(tmp_path / "a" / "out"), 1e-6,
          f"{backend} resumed vs straight losses")  # fmt: skip


def test_resume_from_an_earlier_checkpoint_logs_each_step_once(model_dir, data, tmp_path):
    """A run whose metrics.jsonl went on past the checkpoint it resumes from (steps 3 and 4
    after checkpoint-2, as when it was killed): the resumed run drops those lines and
    writes steps 3 and 4 once, with the uninterrupted run's values."""
    c = config(model_dir, data, tmp_path, backend="torch", max_steps=4, save_steps=2,
               eval_data=str(data[1]), eval_steps=2)  # fmt: skip
    train(c, get_backend("torch"))
    out = tmp_path / "out"
    straight = (out / "metrics.jsonl").read_text()
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss": 0.1')  # and a line cut short by the kill
    train(cfg.build({}, {**c.to_dict(), "resume": str(out / "checkpoint-2")}),
          get_backend("torch"))  # fmt: skip
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in again if "eval_loss" in r] == [2, 4]
    want = [json.loads(line) for line in straight.splitlines()]
    close(
        [r.get("loss", r.get("eval_loss")) for r in again],
        [r.get("loss", r.get("eval_loss")) for r in want],
        1e-6,
        "resumed metrics",
    )


def test_save_total_limit_keeps_the_newest_checkpoints(model_dir, data, tmp_path):
    c = config(model_dir, data, tmp_path, backend="torch", max_steps=4, save_steps=1,
               save_total_limit=2)  # fmt: skip
    train(c, get_backend("torch"))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    written = OutputDir(out).written()
    assert "checkpoint-4" in written and "checkpoint-1" not in written


class PoisonAt(Callbacks):
    """Writes NaN into the weights after step ``n`` (a stand-in for a diverging run)."""

    def __init__(self, backend, n):
        self.backend, self.n = backend, n

    def log(self, record):
        if record.get("step") == self.n:
            state = self.backend.trainable_state()
            self.backend.load_trainable_state({k: v * np.nan for k, v in state.items()})


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_loss_stops_with_a_diagnosis(backend, model_dir, data, tmp_path):
    c = config(model_dir, data, tmp_path, backend=backend, max_steps=4, save_steps=2,
               lora_dropout=0.0)  # fmt: skip
    impl = get_backend(backend)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 3: .*pairs \d+ \(line \d+"):
        train(c, impl, PoisonAt(impl, 2))
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # the last good one
    assert not (out / "checkpoint-3").exists() and not (out / "checkpoint-4").exists()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2


def test_missing_backend_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("mlx") else real(name, *a),
    )
    with pytest.raises(TabpoError, match=r"pip install 'tabpo\[mlx\]'"):
        get_backend("mlx")


def test_output_exists_is_refused(model_dir, data, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(TabpoError, match="exists"):
        train(config(model_dir, data, tmp_path, backend="torch"), get_backend("torch"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_finetuning_writes_a_loadable_model(backend, model_dir, data, tmp_path):
    """Full fine-tuning with the (default) precomputed reference: no second model is kept,
    and the output directory loads in the stack that wrote it with the trained weights."""
    c = config(model_dir, data, tmp_path, backend=backend, finetune="full",
               learning_rate=1e-3, max_steps=2)  # fmt: skip
    run = train(c, get_backend(backend))
    out = tmp_path / "out"
    trained = run.backend.trainable_state()["model.layers.0.mlp.up_proj.weight"]
    if backend == "torch":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out)
        loaded = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    else:
        from mlx_lm.utils import load

        model, _ = load(str(out))
        loaded = np.array(model.model.layers[0].mlp.up_proj.weight)
    np.testing.assert_array_equal(loaded, trained)
    # no second model was kept: the reference came from the cache
    assert getattr(run.backend, "reference", getattr(run.backend, "_reference_model", None)) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_sft_on_prompt_completion_data(backend, model_dir, tmp_path):
    """The SFT stage: full fine-tuning on prompt/completion records, only the completion side
    runs; the NLL of the training completions falls over 8 steps at lr 3e-3."""
    from helpers import write_completions

    data = write_completions(tmp_path / "sft.jsonl", 4)
    c = cfg.build({}, {"model": str(model_dir), "data": str(data), "backend": backend,
                       "output": str(tmp_path / "out"), "loss": "sft", "finetune": "full",
                       "max_steps": 8, "learning_rate": 3e-3, "batch_size": 4,
                       "gradient_accumulation_steps": 1, "warmup_ratio": 0.0})  # fmt: skip
    train(c, get_backend(backend))
    losses = losses_of(tmp_path / "out")
    assert losses[-1] < 0.8 * losses[0], losses
    with pytest.raises(TabpoError, match="needs chosen and rejected pairs"):
        train(cfg.build({}, {**c.to_dict(), "loss": "dpo", "force": True}), get_backend(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_precomputed_ref_model_is_not_kept(backend, model_dir, data, tmp_path):
    """Full fine-tuning against --ref-model with precomputed log-probs: the reference model
    is freed once its log-probs are in the table (one model in memory while training)."""
    ref = build_tiny_model(tmp_path / "ref", "llama", seed=3)
    c = config(model_dir, data, tmp_path, backend=backend, finetune="full", ref_model=str(ref),
               learning_rate=1e-3, max_steps=1)  # fmt: skip
    run = train(c, get_backend(backend))
    assert getattr(run.backend, "reference", getattr(run.backend, "_reference_model", None)) is None
    tokenizer = load_tokenizer(model_dir)
    pairs, _ = encode_pairs(tokenizer, read_preferences(data[0])[0])
    with pytest.raises(TabpoError, match="reference"):
        run.backend.logps(collate(pairs[:2], pad_id(tokenizer)), reference=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(backend, finetune, model_dir, data):
    """Recomputing each decoder layer in the backward changes no number: the gradients of
    a TAB-PO step on a forked batch equal those without checkpointing (float32, dropout 0),
    and every decoder layer is checkpointed."""
    from tabpo import losses
    from tabpo.training.backend import LoraSettings, ModelOptions, seeded_lora_init

    tokenizer = load_tokenizer(model_dir)
    pairs, _ = encode_pairs(tokenizer, read_preferences(data[0])[0])
    batch = collate(pairs[:3], pad_id(tokenizer))
    grads, state = [], None
    for checkpointing in (False, True):
        b = get_backend(backend)
        b.seed(0)
        b.load(ModelOptions(str(model_dir), finetune=finetune, lora=LoraSettings(4, 8.0, 0.0),
                            gradient_checkpointing=checkpointing, prefix_sharing="on"))  # fmt: skip
        if finetune == "lora":  # B != 0, the same on both runs
            state = state or {k: v + 0.05 for k, v in seeded_lora_init(b.trainable_state(),
                                                                        0).items()}  # fmt: skip
            b.load_trainable_state(state)
        b.forward_backward(batch, losses.get("tabpo").bind(), None, 1.0)
        grads.append(b.gradients())
        lm = b.model if backend == "mlx" else b._lm
        layers = lm.model.layers if backend == "mlx" else lm.model.layers
        flags = [bool(getattr(layer, "checkpointed" if backend == "mlx" else
                              "gradient_checkpointing", False)) for layer in layers]  # fmt: skip
        assert flags == [checkpointing] * len(layers), flags
    for name in grads[0]:
        close(grads[1][name].ravel(), grads[0][name].ravel(), 1e-6, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_full_finetuning_moves_the_weights_like_float32(backend, model_dir, data, tmp_path):
    """20 steps at lr 2e-5: each AdamW step is smaller than half a bf16 step of these
    weights, so updating bf16 weights directly leaves them where they were. With float32
    master weights the bf16 run moves them as the float32 run does (the same direction and
    size, to within what bf16 forward passes change)."""
    from tabpo.training.backend import ModelOptions, OptimizerSettings

    moved = {}
    for dtype in ("float32", "bfloat16"):
        start = get_backend(backend)
        start.load(ModelOptions(str(model_dir), dtype=dtype, finetune="full", keep_reference=False))
        start.setup_optimizer(OptimizerSettings())
        before = start.trainable_state()
        c = config(model_dir, data, tmp_path / dtype, backend=backend, dtype=dtype,
                   finetune="full", loss="sft", max_steps=20, learning_rate=2e-5,
                   warmup_ratio=0.0, lr_scheduler="constant")  # fmt: skip
        after = train(c, get_backend(backend)).backend.trainable_state()
        moved[dtype] = np.concatenate([(after[k] - before[k]).ravel() for k in sorted(before)])
    full, half = moved["float32"], moved["bfloat16"]
    size = np.linalg.norm(full)
    assert size > 0, "the float32 run did not move"
    gap = np.linalg.norm(half - full) / size
    assert gap < 0.3 and np.linalg.norm(half) > 0.7 * size, (
        f"{backend}: bf16 moved the weights {np.linalg.norm(half) / size:.2f}x as far as "
        f"float32, {gap:.2f} apart"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_finetuning_resumes_exactly(backend, dtype, model_dir, data, tmp_path):
    """Full fine-tuning, stopped and resumed, continues the straight run exactly; in bf16
    the float32 master weights are saved with the checkpoint (the weights file holds them
    rounded to bf16)."""
    common = {"backend": backend, "dtype": dtype, "finetune": "full", "loss": "sft",
              "max_steps": 4, "learning_rate": 1e-3}  # fmt: skip
    train(config(model_dir, data, tmp_path / "a", **common), get_backend(backend))
    first = config(model_dir, data, tmp_path / "b", **common)
    train(first, get_backend(backend), StopAt(2))
    out = tmp_path / "b" / "out"
    train(cfg.build({}, {**first.to_dict(), "resume": str(out)}), get_backend(backend))
    close(losses_of(out), losses_of(tmp_path / "a" / "out"), 1e-6, f"{backend} {dtype} resume")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_whose_own_forward_does_more_is_refused(backend, model_dir, monkeypatch):
    """A model whose forward adds something to the logits (as Gemma-2's soft-capping does)
    would be trained as another function by tabpo's decoder-plus-head path: the load-time
    probe finds the difference and refuses it in one line."""
    from tabpo.training.backend import ModelOptions

    if backend == "torch":
        from tabpo.backends import _torch_load

        real = _torch_load.load_causal_lm

        def load(*args):
            model = real(*args)
            forward = model.forward

            def biased(*a, **k):
                out = forward(*a, **k)
                out.logits[..., 0] += 5.0
                return out

            model.forward = biased
            return model

        monkeypatch.setattr(_torch_load, "load_causal_lm", load)
    else:
        import mlx.core as mx

        from tabpo.backends import mlx as mlx_backend

        real = mlx_backend.load_model

        def load(*args):
            model, tokenizer = real(*args)
            base = type(model)
            bias = mx.zeros((model.args.vocab_size,)).at[0].add(5.0)
            model.__class__ = type(
                "Biased",
                (base,),
                {"__call__": lambda self, *a, **k: base.__call__(self, *a, **k) + bias},
            )
            return model, tokenizer

        monkeypatch.setattr(mlx_backend, "load_model", load)
    with pytest.raises(TabpoError, match="tabpo's forward and the model's own differ by"):
        get_backend(backend).load(ModelOptions(str(model_dir)))


def test_a_sliding_window_shorter_than_max_length_is_refused(tiny_model, data, tmp_path):
    from tabpo.training.loop import check

    model = tmp_path / "windowed"
    shutil.copytree(tiny_model("qwen2"), model)
    config_file = model / "config.json"
    window = {"use_sliding_window": True, "sliding_window": 64}
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **window}))
    c = config(model, data, tmp_path, max_length=1024)
    with pytest.raises(TabpoError, match="window of 64 tokens, shorter than --max-length 1024"):
        check(c)
    check(config(model, data, tmp_path, max_length=64))  # within the window: both agree
