"""The prompt of one message: a short instruction, the code book of its direction, the message.

The code book lists only the codes the direction allows, one line per code, and folds the
codes whose only sub-code is "None" into one line, so the whole prompt of a typical message
stays under ~1,200 characters (~350 tokens of a byte-level BPE) for small models.
"""

from __future__ import annotations

from tabpo.clinical.schema import NONE, PATIENT_TO_PROVIDER, SCHEMA, codes_for

_PARTIES = {PATIENT_TO_PROVIDER: ("patient", "provider")}

INSTRUCTION = (
    "Annotate this secure message from a {sender} to their {receiver}. Answer with JSON only: "
    '{{"results": [{{"Code": ..., "Sub-code": ..., "Span": ...}}]}}, one item per annotated '
    "phrase in order of appearance, Span copied exactly from the message; "
    '{{"results": []}} if nothing applies.'
)


def code_book(direction: str) -> str:
    """``Code: sub-code, sub-code`` lines for the codes of the direction, schema order."""
    codes = codes_for(direction)
    lines = [f"{code}: {', '.join(SCHEMA[code])}" for code in codes if SCHEMA[code] != (NONE,)]
    bare = [code for code in codes if SCHEMA[code] == (NONE,)]
    if bare:
        lines.append(f"{', '.join(bare)}: {NONE}")
    return "\n".join(lines)


def build_prompt(message: str, direction: str) -> str:
    """Instruction naming the direction, then ``Codes:`` and ``Message:`` sections."""
    sender, receiver = _PARTIES.get(direction, ("provider", "patient"))
    instruction = INSTRUCTION.format(sender=sender, receiver=receiver)
    return f"{instruction}\nCodes:\n{code_book(direction)}\nMessage:\n{message}"
