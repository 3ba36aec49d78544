"""`tabpo demo`: SFT vs DPO vs TAB-PO (and the other baselines) on the embedded benchmark.

One offline run: generate the benchmark's splits, get an SFT model, build pairs from its own
confusions on the preference split (docs/method.md §4), train each method from the same SFT
weights under the same budget (the same steps, batch and learning rate), evaluate every
model on the held-out test phrasings (docs/method.md §5), and write ``report.md``,
``results.json`` and ``figure.png`` (``report.py``; intervals by ``stats.py``).

Two ways to the SFT model (``DemoSettings.finetune``):

- ``full``: ``model`` is already SFT-trained (the shipped tiny model); every method is full
  fine-tuning from it, with a frozen copy as the reference.
- ``lora`` (``tabpo demo --model DIR``, a user's pretrained model): LoRA SFT on the SFT
  split first, the adapter merged into a full SFT model (the merge ``tabpo merge`` runs),
  then each method trains a LoRA adapter on that merged model, whose adapter-free weights
  are the reference, as a TRL user does after merging an SFT adapter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tabpo.clinical import generate_split
from tabpo.clinical.annotate import count, make_pairs, predict, read_records
from tabpo.clinical.evaluation import Counts, from_counts, summed
from tabpo.clinical.stats import as_rows
from tabpo.common.files import write_jsonl
from tabpo.data.encoding import load_tokenizer
from tabpo.training import config as cfg
from tabpo.training.backend import Backend, ModelOptions
from tabpo.training.loop import Callbacks, train

# what a demo writes into its output directory (the split files, the training runs, the
# merged SFT model of the LoRA path and the reference cache, the report)
OUTPUTS = ("data", "runs", "sft-model", "cache", "report.md", "results.json", "figure.png")
DEFAULT_METHODS = ("dpo", "tabpo")
FULL_METHODS = ("dpo", "ipo", "simpo", "cal_dpo", "dpop", "tabpo")
# Per-method hyperparameters (chosen on the dev split, same budget for all; see README).
HPARAMS: dict[str, dict[str, Any]] = {
    "dpo": {"beta": 0.1},
    "ipo": {"beta": 0.1},
    "simpo": {"beta": 0.5, "gamma": 0.5},
    "cal_dpo": {"beta": 0.1},
    "dpop": {"beta": 0.1},
    "tabpo": {"beta": 0.5, "tau": 0.66, "barrier_weight": 0.5},
}
HEADLINE = ("code/f1", "subcode/f1", "span/f1", "triplet/f1", "json_valid", "span_verbatim",
            "snap_span/f1", "snap_triplet/f1")  # fmt: skip
# The LoRA path's learning rates, SFT and the methods (not tuned; the project's LoRA default
# 2e-4 is the paper's, half of it for the preference methods)
SFT_LEARNING_RATE, LORA_LEARNING_RATE = 2e-4, 1e-4
# (adapter directory, its base model, destination): writes the merged model directory
Merge = Callable[[Path, Path, Path], object]


@dataclass
class DemoSettings:
    out: Path
    model: Path
    backend: str = "auto"
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: int = 1
    pref_size: int = 1000
    test_size: int = 300
    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 2e-5  # the methods' (full fine-tuning; LoRA: LORA_LEARNING_RATE)
    max_new_tokens: int = 160
    data_seed: int = 0
    eval_split: str = "test"  # "dev" for choosing hyperparameters
    finetune: str = "full"  # module docstring: full (model is SFT) or lora (SFT first)
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    # the LoRA path only
    sft_size: int = 2000
    sft_steps: int = 200
    sft_learning_rate: float = SFT_LEARNING_RATE
    lora_rank: int = 16


@dataclass
class DemoResult:
    settings: dict[str, Any]
    pair_stats: dict[str, int]
    scores: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # model -> seeds
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # logps/chosen
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall-clock time
    # every test message's counts (stats.as_rows): model -> seeds -> messages -> columns
    columns: list[str] = field(default_factory=list)
    counts: dict[str, list[list[list[int]]]] = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str, callbacks: Callbacks) -> Iterator[None]:
        """Record the stage's wall-clock time and say it (the demo runs for minutes)."""
        start = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - start, 1)
        callbacks.message(f"{stage}: {self.seconds[stage]:.0f} s")

    def add(self, model: str, counts: Counts) -> None:
        """One evaluation (of ``model``, the next seed): its metrics, and its counts kept
        per message for the intervals."""
        self.columns, rows = as_rows(counts)
        self.counts.setdefault(model, []).append(rows)
        self.scores.setdefault(model, []).append(from_counts(summed(counts)))


def run_demo(
    s: DemoSettings, make_backend: Callable[[str], Backend], callbacks: Callbacks,
    merge: Merge | None = None,
) -> DemoResult:  # fmt: skip
    """The whole comparison; ``merge`` (the LoRA path) folds the SFT adapter into its base."""
    if s.finetune == "lora" and merge is None:
        raise ValueError("the LoRA path needs a merge function")
    data = s.out / "data"
    test = read_records(write_jsonl(generate_split(s.eval_split, s.test_size, s.data_seed),
                                    data / f"{s.eval_split}.jsonl"))  # fmt: skip
    pref = read_records(write_jsonl(generate_split("pref", s.pref_size, s.data_seed),
                                    data / "pref.jsonl"))  # fmt: skip
    tokenizer = load_tokenizer(s.model)

    def answers(backend: Backend, records: list[dict[str, Any]], name: str) -> list[str]:
        callbacks.phase(name, len(records))
        return predict(backend, tokenizer, records, max_new_tokens=s.max_new_tokens,
                       progress=lambda n: callbacks.advance(name, n))  # fmt: skip

    result = DemoResult(settings=typed(asdict(s)), pair_stats={})
    start = s.model  # the SFT model every method trains from
    if s.finetune == "lora":
        sft_run = s.out / "runs" / "sft"
        with result.timed("train SFT (LoRA)", callbacks):
            sft = train_sft(s, sft_run, make_backend, callbacks)
    else:
        sft = make_backend(s.backend)
        sft.load(ModelOptions(path=str(s.model), dtype=s.dtype, finetune="full",
                              keep_reference=False))  # fmt: skip
    with result.timed(f"SFT on {s.eval_split}", callbacks):
        result.add("sft", count(test, answers(sft, test, f"SFT on {s.eval_split}"), snap=True))
    with result.timed("SFT on pref (for the pairs)", callbacks):
        predicted = answers(sft, pref, "SFT on pref")
    rows, result.pair_stats = make_pairs(pref, predicted, strategy="confusion",
                                         seed=s.data_seed)  # fmt: skip
    pairs_path = write_jsonl(rows, data / "pairs.jsonl")
    callbacks.message(f"{len(rows)} pairs from the SFT model's confusions -> {pairs_path}")
    del sft
    if s.finetune == "lora" and merge is not None:
        start = s.out / "sft-model"
        with result.timed("merge the SFT adapter", callbacks):
            merge(sft_run, s.model, start)
    for seed in range(s.seeds):
        for method in s.methods:
            run_dir = s.out / "runs" / f"{method}-seed{seed}"
            c = config(s, model=start, data=pairs_path, output=run_dir, loss=method, seed=seed,
                       learning_rate=s.learning_rate, max_steps=s.steps,
                       **HPARAMS.get(method, {}))  # fmt: skip
            callbacks.message(f"training {method} (seed {seed})")
            with result.timed(f"train {method} (seed {seed})", callbacks):
                trained = train(c, make_backend(s.backend), callbacks)
            name = f"{method} on {s.eval_split}"
            with result.timed(f"{name} (seed {seed})", callbacks):
                result.add(method, count(test, answers(trained.backend, test, name), snap=True))
            if seed == 0:
                result.curves[method] = chosen_curve(run_dir / "metrics.jsonl")
    return result


def train_sft(
    s: DemoSettings, output: Path, make_backend: Callable[[str], Backend], callbacks: Callbacks
) -> Backend:
    """LoRA SFT of ``s.model`` on the benchmark's SFT split; the backend holding it."""
    split = write_jsonl(generate_split("sft", s.sft_size, s.data_seed),
                        s.out / "data" / "sft.jsonl")  # fmt: skip
    c = config(s, model=s.model, data=split, output=output, loss="sft", seed=0,
               learning_rate=s.sft_learning_rate, max_steps=s.sft_steps)  # fmt: skip
    callbacks.message(f"SFT with LoRA on {s.sft_size} messages ({s.sft_steps} steps)")
    return train(c, make_backend(s.backend), callbacks).backend


def config(s: DemoSettings, **options: Any) -> cfg.TrainConfig:
    """One training run of the demo: the settings every run shares, then ``options``."""
    lora = {"lora_rank": s.lora_rank, "lora_alpha": 2.0 * s.lora_rank}  # alpha / r = 2
    return cfg.build({}, {
        "backend": s.backend, "finetune": s.finetune, "dtype": s.dtype, "force": True,
        "gradient_checkpointing": s.gradient_checkpointing, "batch_size": s.batch_size,
        "gradient_accumulation_steps": 1, "warmup_ratio": 0.1, "lr_scheduler": "linear",
        "max_length": 512, "ref_cache_dir": str(s.out / "cache"),
        **(lora if s.finetune == "lora" else {}),
        **{k: str(v) if isinstance(v, Path) else v for k, v in options.items()},
    })  # fmt: skip


def typed(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON values of their own types (paths as strings, tuples as lists)."""
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in settings.items()}  # fmt: skip


def chosen_curve(metrics: Path) -> list[tuple[int, float]]:
    """(step, mean chosen sequence log-prob) over training: likelihood squeezing shows here."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["logps/chosen"]) for r in rows if "logps/chosen" in r]
