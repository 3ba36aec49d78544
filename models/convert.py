"""``tabpo convert``: a model directory or a LoRA adapter from one stack's format to the other's.

What a source is comes from its files: config.json + model*.safetensors is a model,
adapter_model.safetensors a PEFT adapter, adapters.safetensors an mlx-lm adapter. Everything
is read and checked first; the result is written into a temporary sibling of the
destination, verified there (models/verify.py), and only then renamed into place, so a
failure at any point leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tabpo.common.errors import TabpoError
from tabpo.common.files import write_dir
from tabpo.models import adapters as fmt
from tabpo.models.coverage import check_base, fill_suffix
from tabpo.models.families import weight_files
from tabpo.models.model_dir import INDEX, STACKS, SourceModel, read_model, write_model
from tabpo.models.tensors import DTYPE_CODES
from tabpo.models.verify import TOLERANCES, Side, Verification, should_verify, verified, verify

KINDS = {"model": "model", "peft": "PEFT adapter", "mlx": "mlx-lm adapter"}
STACK_OF = {"peft": "torch", "mlx": "mlx"}


@dataclass(frozen=True)
class Outcome:
    """What a conversion or merge wrote, for the CLI's one-line summary."""

    kind: str  # what the source was: model, peft, mlx
    result: str  # what was written: model, peft, mlx
    to: str
    dst: Path
    detail: str
    notes: tuple[str, ...] = ()
    verification: Verification | None = None
    unverified: str | None = None  # why there is no verification


def detect(path: Path) -> str:
    """``model``, ``peft`` or ``mlx`` from the files in ``path``; a TabpoError otherwise."""
    if not path.is_dir():
        raise TabpoError(f"{path}: {'not a directory' if path.exists() else 'not found'}")
    if (path / fmt.PEFT_WEIGHTS).is_file():
        return "peft"
    if (path / fmt.MLX_WEIGHTS).is_file():
        return "mlx"
    if (path / "config.json").is_file() and (weight_files(path) or (path / INDEX).is_file()):
        return "model"
    if (path / fmt.CONFIG).is_file():
        raise TabpoError(
            f"{path}: {fmt.CONFIG} but neither {fmt.PEFT_WEIGHTS} nor "
            f"{fmt.MLX_WEIGHTS} (missing adapter weights)"
        )
    if (path / "config.json").is_file():
        raise TabpoError(
            f"{path}: config.json but no model*.safetensors (only safetensors "
            "weights are supported)"
        )
    raise TabpoError(
        f"{path}: not a model directory (config.json + model*.safetensors) nor a "
        f"LoRA adapter ({fmt.PEFT_WEIGHTS} or {fmt.MLX_WEIGHTS})"
    )


def check_options(to: str, dtype: str | None) -> None:
    if to not in STACKS:
        raise TabpoError(f"--to must be one of {', '.join(STACKS)}, not {to!r}")
    if dtype is not None and dtype not in DTYPE_CODES:
        raise TabpoError(f"--dtype must be one of {', '.join(DTYPE_CODES)}, not {dtype!r}")


def check_destination(dst: Path, *, force: bool, inputs: tuple[Path | None, ...]) -> None:
    """Refuse an existing ``dst`` without ``force``, and any ``dst`` whose replacement would
    delete one of the ``inputs``."""
    target = dst.resolve()
    for item in inputs:
        if item is not None and (target == item.resolve() or target in item.resolve().parents):
            raise TabpoError(f"{dst}: the destination would replace the input {item}")
    if dst.exists() and not force:
        raise TabpoError(f"{dst} already exists (pass --force to replace it)")


def rope_note(base: SourceModel) -> tuple[str, ...]:
    """mlx-lm's llama and qwen2 ignore a nested rope_theta: say how to load the base alike."""
    config = base.info.config
    if "rope_theta" in config and config.get("tie_word_embeddings") is not None:
        return ()
    return (
        f"mlx-lm reads {base.path} as this model only with model_config="
        f"{base.info.mlx_overrides()} (or convert the base with --to mlx first)",
    )


def convert(
    src: Path,
    dst: Path,
    *,
    to: str,
    base: Path | None = None,
    dtype: str | None = None,
    force: bool = False,
    dequantize: bool = False,
    verify_result: bool | None = None,
    tolerance: float | None = None,
) -> Outcome:
    """Convert ``src`` into ``dst`` for the stack ``to`` (the module docstring)."""
    check_options(to, dtype)
    kind = detect(src)
    if kind == "model" and base is not None:
        raise TabpoError(f"--base is for adapters; {src} is a model directory")
    if kind != "model" and dequantize:
        raise TabpoError(f"--dequantize is for model directories; {src} is a {KINDS[kind]}")
    check_destination(dst, force=force, inputs=(src, base))
    tol = tolerance if tolerance is not None else TOLERANCES[dtype or "float32"]
    if kind == "model":
        return _convert_model(src, dst, to, dtype, dequantize, verify_result, tol)
    return _convert_adapter(src, kind, dst, to, base, dtype, verify_result, tol)


def _convert_model(
    src: Path,
    dst: Path,
    to: str,
    dtype: str | None,
    dequantize: bool,
    verify_result: bool | None,
    tol: float,
) -> Outcome:
    source = read_model(src, dequantize=dequantize)
    do_verify = should_verify(verify_result)
    # a quantized source only loads in mlx-lm; otherwise score it in the other stack
    source_stack = "mlx" if source.quantized or to == "torch" else "torch"
    overrides = source.info.mlx_overrides() if source_stack == "mlx" else None
    checked: list[Verification] = []
    shards: list[int] = []

    def fill(tmp: Path) -> None:
        shards.append(write_model(tmp, source, to=to, dtype=dtype))
        if do_verify:
            checked.append(
                verify(
                    Side(source_stack, src, overrides=overrides),
                    Side(to, tmp),
                    vocab=source.info.config["vocab_size"],
                    tolerance=tol,
                )
            )

    write_dir(dst, fill)
    notes = (
        [f"dequantized {len(source.quantized)} MLX-quantized weights"] if source.quantized else []
    )
    detail = f"{source.info.family}, {shards[0]} shard{'s' * (shards[0] > 1)}"
    return Outcome(
        "model", "model", to, dst, detail, tuple(notes), *verified(checked, verify_result)
    )


def _convert_adapter(
    src: Path,
    kind: str,
    dst: Path,
    to: str,
    base: Path | None,
    dtype: str | None,
    verify_result: bool | None,
    tol: float,
) -> Outcome:
    result = "mlx" if to == "mlx" else "peft"
    if kind == result:
        raise TabpoError(f"{src} is already a {KINDS[kind]} (--to {to}): nothing to convert")
    adapter = fmt.read_peft(src) if kind == "peft" else fmt.read_mlx(src)
    do_verify = should_verify(verify_result)
    if base is None and result == "mlx":  # whether verified or not
        raise TabpoError(
            "--base DIR (the adapter's base model) is required to write an mlx-lm adapter: "
            "mlx-lm counts the adapted blocks from the last one, so the base's layer count "
            "is needed"
        )
    if base is None and do_verify:
        raise TabpoError(
            "--base DIR (the adapter's base model) is required to verify the conversion "
            "(--no-verify converts without it)"
        )
    base_model = read_model(base) if base is not None else None
    if base_model is not None:
        check_base(adapter, base_model)
    notes: list[str] = []
    if result == "mlx":
        assert base_model is not None  # required above
        adapter, filled = fill_suffix(adapter, base_model)
        if filled:
            notes.append(
                f"zero-filled {filled} modules PEFT did not adapt (mlx-lm adapts the "
                "same modules in every block from the first adapted one to the last)"
            )
        notes.extend(rope_note(base_model))
    if dtype:
        adapter = fmt.cast_adapter(adapter, DTYPE_CODES[dtype])
    checked: list[Verification] = []
    layers = base_model.info.num_layers if base_model is not None else None

    def fill(tmp: Path) -> None:
        if result == "mlx":
            fmt.write_mlx(tmp, adapter, base_layers=layers or 0)
        else:
            base_name = str(base) if base is not None else adapter.base_name
            fmt.write_peft(tmp, adapter, base=base_name, base_layers=layers)
        if do_verify:
            assert base is not None and base_model is not None  # required above
            info = base_model.info
            source = Side(STACK_OF[kind], base, src, info.mlx_overrides())
            written = Side(to, base, tmp, info.mlx_overrides())
            checked.append(verify(source, written, vocab=info.config["vocab_size"], tolerance=tol))

    write_dir(dst, fill)
    dora = ", DoRA" if adapter.dora else ""
    detail = f"{len(adapter.modules)} modules, rank {adapter.rank}, scale {adapter.scale:g}{dora}"
    return Outcome(kind, result, to, dst, detail, tuple(notes), *verified(checked, verify_result))
