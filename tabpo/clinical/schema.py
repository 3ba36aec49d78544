"""The annotation schema of the paper (docs/method.md §6) and its one JSON serialisation.

8 codes and 26 sub-codes (27 exact strings: "Clinical care" under PartnershipPatient and
"Clinical Care" under PartnershipProvider differ in case). SocioEmotionalBehaviour and the
two CareCoordination codes carry the sub-code "None". One annotated item is a dict
``{"Code": str, "Sub-code": str, "Span": str}``; the Span is a verbatim substring of the
message.

The message direction decides which Partnership, SharedDecision and CareCoordination codes
apply; SDOH and SocioEmotionalBehaviour apply in both directions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

Item = dict[str, str]

NONE = "None"
KEYS = ("Code", "Sub-code", "Span")
PATIENT_TO_PROVIDER = "patient_to_provider"
PROVIDER_TO_PATIENT = "provider_to_patient"
DIRECTIONS = (PATIENT_TO_PROVIDER, PROVIDER_TO_PATIENT)

SCHEMA: dict[str, tuple[str, ...]] = {
    "PartnershipPatient": (
        "Appreciation/Gratitude",
        "Clinical care",
        "activeParticipation/involvement",
        "alignment",
        "build trust",
        "connection",
        "expressOpinions",
        "salutation",
        "signoff",
        "statePreferences",
    ),
    "PartnershipProvider": (
        "Appreciation/Gratitude",
        "Clinical Care",
        "acknowledgePatientExpertiseKnowledge",
        "alignment",
        "build trust",
        "checkingUnderstanding/clarification",
        "connection",
        "inviteCollabration",
        "maintainCommunication",
        "requestsForOpinion",
        "salutation",
        "signoff",
    ),
    "SDOH": (
        "EconomicStability",
        "EducationAccessAndQuality",
        "HealthCareAccessAndQuality",
        "NeighborhoodAndBuiltEnvironment",
        "SocialAndCommunityContext",
    ),
    "SharedDecisionPatient": (
        "ApprovalofDecision/Reinforcement",
        "ExploreOptions",
        "SeekingApproval",
    ),
    "SharedDecisionProvider": ("Approval/Reinforcement", "MakeDecision", "ShareOptions"),
    "SocioEmotionalBehaviour": (NONE,),
    "CareCoordinationProvider": (NONE,),
    "CareCoordinationPatient": (NONE,),
}

DIRECTION_CODES: dict[str, tuple[str, ...]] = {
    PATIENT_TO_PROVIDER: (
        "PartnershipPatient",
        "SDOH",
        "SharedDecisionPatient",
        "SocioEmotionalBehaviour",
        "CareCoordinationPatient",
    ),
    PROVIDER_TO_PATIENT: (
        "PartnershipProvider",
        "SDOH",
        "SharedDecisionProvider",
        "SocioEmotionalBehaviour",
        "CareCoordinationProvider",
    ),
}

SUBCODES: frozenset[str] = frozenset(s for subs in SCHEMA.values() for s in subs)


def codes_for(direction: str) -> tuple[str, ...]:
    """The codes allowed in a message of this direction, in schema order."""
    try:
        return DIRECTION_CODES[direction]
    except KeyError:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}") from None


def labels_for(direction: str) -> list[tuple[str, str]]:
    """Every (code, sub-code) allowed in a message of this direction, in schema order."""
    return [(code, sub) for code in codes_for(direction) for sub in SCHEMA[code]]


def is_valid(code: str, subcode: str, direction: str) -> bool:
    """True when the code applies to the direction and the sub-code belongs to the code."""
    return code in codes_for(direction) and subcode in SCHEMA[code]


def item(code: str, subcode: str, span: str) -> Item:
    """One annotated item with its keys in canonical order."""
    return {"Code": code, "Sub-code": subcode, "Span": span}


def canonical_json(items: Iterable[Mapping[str, str]]) -> str:
    """The one serialisation of an annotation, used for completions, chosen and rejected.

    ``{"results": [{"Code": c, "Sub-code": s, "Span": x}, ...]}`` with the separators
    ``", "`` and ``": "``, keys in the order Code, Sub-code, Span, items in the order given
    (callers keep the order of appearance in the message), and non-ASCII characters kept
    as they are so a span reads exactly as in the message. ``{"results": []}`` when empty.
    """
    results = [item(str(i["Code"]), str(i["Sub-code"]), str(i["Span"])) for i in items]
    return json.dumps({"results": results}, ensure_ascii=False, separators=(", ", ": "))


def read_completion(text: str) -> list[Item]:
    """The items of a canonical completion (gold data; raises ValueError when malformed)."""
    tree = json.loads(text)
    if not isinstance(tree, dict) or not isinstance(tree.get("results"), list):
        raise ValueError('expected {"results": [...]}')
    return [item(r["Code"], r["Sub-code"], r["Span"]) for r in tree["results"]]
