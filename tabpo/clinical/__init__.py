"""The clinical benchmark application: schema, synthetic data, pairs, evaluation, annotation,
the demo and its report. May import: tabpo.common, tabpo.losses, tabpo.data, tabpo.training.

The real data (1,137 annotated secure messages) is private; `generate_splits` builds
seeded synthetic patient <-> provider messages in the same schema (docs/method.md §6).
"""

from tabpo.clinical.generator import (
    DEFAULT_SIZES,
    SPLIT_FILES,
    SPLITS,
    generate_message,
    generate_split,
    generate_splits,
    make_record,
    phrasing_group,
    write_splits,
)
from tabpo.clinical.prompt import build_prompt, code_book
from tabpo.clinical.schema import (
    DIRECTIONS,
    PATIENT_TO_PROVIDER,
    PROVIDER_TO_PATIENT,
    SCHEMA,
    Item,
    canonical_json,
    codes_for,
    is_valid,
    labels_for,
    read_completion,
)

__all__ = [
    "DEFAULT_SIZES",
    "DIRECTIONS",
    "PATIENT_TO_PROVIDER",
    "PROVIDER_TO_PATIENT",
    "SCHEMA",
    "SPLITS",
    "SPLIT_FILES",
    "Item",
    "build_prompt",
    "canonical_json",
    "code_book",
    "codes_for",
    "generate_message",
    "generate_split",
    "generate_splits",
    "is_valid",
    "labels_for",
    "make_record",
    "phrasing_group",
    "read_completion",
    "write_splits",
]
