"""What every command shares: the consoles and the one-line error convention."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from tabpo.common.errors import TabpoError

# Output to a file or a pipe (CI, logs) is laid out for 120 columns, not Rich's 80, unless
# COLUMNS says otherwise; a terminal uses its own width.
_PIPED_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS") or 120)
console = Console(width=_PIPED_WIDTH)
err_console = Console(stderr=True, width=_PIPED_WIDTH)

F = TypeVar("F", bound=Callable[..., Any])


def launched_rank() -> int | None:
    """This process's rank when torchrun (``RANK``) or mlx.launch (``MLX_RANK``) started it,
    else None. Only rank 0 talks; an error names the rank it happened on."""
    rank = os.environ.get("RANK", os.environ.get("MLX_RANK"))
    return int(rank) if rank is not None and rank.isdigit() else None


def handles_errors(fn: F) -> F:
    """Turn a TabpoError into one red line on stderr and exit code 2 (no traceback); under a
    launcher the line names the rank, and the launcher then stops the other ranks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TabpoError as exc:
            rank = launched_rank()
            where = "" if rank is None else f"rank {rank}: "
            # the message is text, not markup: "[load_safetensors] ..." must print as it is
            err_console.print(f"[bold red]error:[/] {where}{escape(str(exc))}", highlight=False,
                              soft_wrap=True)  # fmt: skip
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def quiet_libraries() -> None:
    """Our progress bars, not the libraries' own loading bars and deprecation notes."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # peft reads transformers 5's deprecated is_gradient_checkpointing: understood, harmless
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)  # fmt: skip


def load_adapter(impl: Any, model: Any, adapter: Any, dtype: str) -> None:
    """Load ``model`` with the LoRA settings of ``adapter`` (PEFT or mlx-lm) into ``impl``,
    then its factors; modules the adapter leaves out (mlx-lm covers only the last blocks)
    get zero factors, which add nothing."""
    import numpy as np

    from tabpo.models.adapters import read_adapter, read_canonical
    from tabpo.training.backend import LoraSettings, ModelOptions

    info = read_adapter(adapter)
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in info.modules}))
    lora = LoraSettings(rank=info.rank, alpha=info.scale * info.rank, dropout=0.0,
                        target_modules=targets)  # fmt: skip
    impl.load(ModelOptions(path=str(model), dtype=dtype, finetune="lora", lora=lora,
                           keep_reference=False))  # fmt: skip
    state = read_canonical(adapter)
    full = {k: state.get(k, np.zeros_like(v)) for k, v in impl.trainable_state().items()}
    impl.load_trainable_state({**full, **state})
