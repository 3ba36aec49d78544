"""`tabpo demo`: SFT vs DPO vs TAB-PO (and the other baselines) on the embedded benchmark.

One offline run: generate the benchmark's preference / dev / test splits, load the shipped
SFT model, build pairs from its own confusions on the preference split (docs/method.md §4),
train each method from the same SFT weights under the same budget (full fine-tuning, the
same steps, batch and learning rate), evaluate every model on the held-out test phrasings
(docs/method.md §5), and write ``report.md``, ``results.json`` and ``figure.png``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tabpo.clinical import generate_split
from tabpo.clinical.annotate import evaluate, make_pairs, predict, read_records
from tabpo.common.files import write_jsonl
from tabpo.data.encoding import load_tokenizer
from tabpo.training import config as cfg
from tabpo.training.backend import Backend, ModelOptions
from tabpo.training.loop import Callbacks, train

# what a demo writes into its output directory (the split files, the training runs and the
# reference cache, the report)
OUTPUTS = ("data", "runs", "cache", "report.md", "results.json", "figure.png")
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
    learning_rate: float = 2e-5
    max_new_tokens: int = 160
    data_seed: int = 0
    eval_split: str = "test"  # "dev" for choosing hyperparameters


@dataclass
class DemoResult:
    settings: dict[str, Any]
    pair_stats: dict[str, int]
    scores: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # method -> seeds
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # logps/chosen
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall-clock time

    @contextmanager
    def timed(self, stage: str, callbacks: Callbacks) -> Iterator[None]:
        """Record the stage's wall-clock time and say it (the demo runs for minutes)."""
        start = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - start, 1)
        callbacks.message(f"{stage}: {self.seconds[stage]:.0f} s")


def run_demo(
    s: DemoSettings, make_backend: Callable[[str], Backend], callbacks: Callbacks
) -> DemoResult:
    data = s.out / "data"
    test = read_records(write_jsonl(generate_split(s.eval_split, s.test_size, s.data_seed),
                                    data / f"{s.eval_split}.jsonl"))  # fmt: skip
    pref = read_records(write_jsonl(generate_split("pref", s.pref_size, s.data_seed),
                                    data / "pref.jsonl"))  # fmt: skip
    tokenizer = load_tokenizer(s.model)
    sft = make_backend(s.backend)
    sft.load(ModelOptions(path=str(s.model), finetune="full", keep_reference=False))

    def answers(backend: Backend, records: list[dict[str, Any]], name: str) -> list[str]:
        callbacks.phase(name, len(records))
        return predict(backend, tokenizer, records, max_new_tokens=s.max_new_tokens,
                       progress=lambda n: callbacks.advance(name, n))  # fmt: skip

    result = DemoResult(settings=typed(asdict(s)), pair_stats={})
    with result.timed(f"SFT on {s.eval_split}", callbacks):
        sft_scores = evaluate(test, answers(sft, test, f"SFT on {s.eval_split}"), snap=True)
    result.scores["sft"] = [sft_scores] * s.seeds
    with result.timed("SFT on pref (for the pairs)", callbacks):
        predicted = answers(sft, pref, "SFT on pref")
    rows, result.pair_stats = make_pairs(pref, predicted, strategy="confusion",
                                         seed=s.data_seed)  # fmt: skip
    pairs_path = write_jsonl(rows, data / "pairs.jsonl")
    callbacks.message(f"{len(rows)} pairs from the SFT model's confusions -> {pairs_path}")
    del sft
    for seed in range(s.seeds):
        for method in s.methods:
            run_dir = s.out / "runs" / f"{method}-seed{seed}"
            c = cfg.build({}, {
                "model": str(s.model), "data": str(pairs_path), "output": str(run_dir),
                "backend": s.backend, "loss": method, "finetune": "full", "force": True,
                "learning_rate": s.learning_rate, "max_steps": s.steps, "seed": seed,
                "batch_size": s.batch_size, "gradient_accumulation_steps": 1,
                "warmup_ratio": 0.1, "lr_scheduler": "linear", "max_length": 512,
                "ref_cache_dir": str(s.out / "cache"), **HPARAMS.get(method, {}),
            })  # fmt: skip
            callbacks.message(f"training {method} (seed {seed})")
            with result.timed(f"train {method} (seed {seed})", callbacks):
                trained = train(c, make_backend(s.backend), callbacks)
            name = f"{method} on {s.eval_split}"
            with result.timed(f"{name} (seed {seed})", callbacks):
                scores = evaluate(test, answers(trained.backend, test, name), snap=True)
            result.scores.setdefault(method, []).append(scores)
            if seed == 0:
                result.curves[method] = chosen_curve(run_dir / "metrics.jsonl")
    return result


def typed(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON values of their own types (paths as strings, tuples as lists)."""
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in settings.items()}  # fmt: skip


def chosen_curve(metrics: Path) -> list[tuple[int, float]]:
    """(step, mean chosen sequence log-prob) over training: likelihood squeezing shows here."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["logps/chosen"]) for r in rows if "logps/chosen" in r]


def summary(result: DemoResult) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> metric -> (mean, standard deviation over seeds; 0 for one seed)."""
    out = {}
    for method, runs in result.scores.items():
        out[method] = {
            k: (statistics.fmean(r[k] for r in runs),
                statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0)
            for k in HEADLINE if all(k in r for r in runs)
        }  # fmt: skip
    return out
