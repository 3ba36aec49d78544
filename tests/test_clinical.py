"""The synthetic clinical benchmark: schema, generator invariants, phrasing splits, prompts."""

from __future__ import annotations

import json
import re

import pytest

from tabpo.clinical import (
    DEFAULT_SIZES,
    PATIENT_TO_PROVIDER,
    PROVIDER_TO_PATIENT,
    SCHEMA,
    canonical_json,
    codes_for,
    generate_split,
    generate_splits,
    generator,
    is_valid,
    labels_for,
    read_completion,
    write_splits,
)
from tabpo.clinical.fillers import SLOTS
from tabpo.clinical.generator import (
    COPY_PROB,
    PHRASINGS,
    copy_pieces,
    copy_split,
    phrasing_group,
    phrasings,
    render,
    sft_vocabulary,
)
from tabpo.common.files import write_jsonl

SMALL = {"sft": 400, "pref": 200, "dev": 100, "test": 200}

# docs/method.md §6, copied by hand
METHOD_SCHEMA = {
    "PartnershipPatient": [
        "Appreciation/Gratitude", "Clinical care", "activeParticipation/involvement",
        "alignment", "build trust", "connection", "expressOpinions", "salutation", "signoff",
        "statePreferences",
    ],
    "PartnershipProvider": [
        "Appreciation/Gratitude", "Clinical Care", "acknowledgePatientExpertiseKnowledge",
        "alignment", "build trust", "checkingUnderstanding/clarification", "connection",
        "inviteCollabration", "maintainCommunication", "requestsForOpinion", "salutation",
        "signoff",
    ],
    "SDOH": [
        "EconomicStability", "EducationAccessAndQuality", "HealthCareAccessAndQuality",
        "NeighborhoodAndBuiltEnvironment", "SocialAndCommunityContext",
    ],
    "SharedDecisionPatient": [
        "ApprovalofDecision/Reinforcement", "ExploreOptions", "SeekingApproval",
    ],
    "SharedDecisionProvider": ["Approval/Reinforcement", "MakeDecision", "ShareOptions"],
    "SocioEmotionalBehaviour": ["None"],
    "CareCoordinationProvider": ["None"],
    "CareCoordinationPatient": ["None"],
}  # fmt: skip


@pytest.fixture(scope="module")
def splits():
    return generate_splits(seed=7, sizes=SMALL)


def _all(splits):
    return [r for records in splits.values() for r in records]


def test_schema_is_method_section_6():
    """8 codes; 26 sub-codes counted case-insensitively without "None" (10 + 5 new in
    PartnershipProvider, "Clinical Care" being "Clinical care" + 5 SDOH + 3 + 3); 27 exact
    strings, because the two "Clinical care"s differ in case."""
    assert {c: list(s) for c, s in SCHEMA.items()} == METHOD_SCHEMA
    subs = {s for v in SCHEMA.values() for s in v} - {"None"}
    assert len(SCHEMA) == 8
    assert len({s.lower() for s in subs}) == 26
    assert len(subs) == 27


def test_direction_decides_codes():
    assert set(codes_for(PATIENT_TO_PROVIDER)) == {
        "PartnershipPatient", "SDOH", "SharedDecisionPatient", "SocioEmotionalBehaviour",
        "CareCoordinationPatient",
    }  # fmt: skip
    assert set(codes_for(PROVIDER_TO_PATIENT)) == {
        "PartnershipProvider", "SDOH", "SharedDecisionProvider", "SocioEmotionalBehaviour",
        "CareCoordinationProvider",
    }  # fmt: skip
    assert is_valid("CareCoordinationPatient", "None", PATIENT_TO_PROVIDER)
    assert not is_valid("CareCoordinationPatient", "None", PROVIDER_TO_PATIENT)
    assert not is_valid("PartnershipPatient", "Clinical Care", PATIENT_TO_PROVIDER)
    with pytest.raises(ValueError, match="unknown direction"):
        codes_for("sideways")


def test_canonical_json_exact_text():
    items = [{"Span": "Hi Dr. Kim", "Sub-code": "salutation", "Code": "PartnershipPatient"}]
    assert canonical_json(items) == (
        '{"results": [{"Code": "PartnershipPatient", "Sub-code": "salutation", '
        '"Span": "Hi Dr. Kim"}]}'
    )
    assert canonical_json([]) == '{"results": []}'
    assert canonical_json([{"Code": "SDOH", "Sub-code": "x", "Span": "café"}]).endswith(
        '"Span": "café"}]}'
    )


def test_templates_cover_every_label_with_enough_phrasings():
    """>= 8 templates per label, one [span] each, slots all known; provider messages carry
    no SDOH phrasings (SDOH stays a valid code there)."""
    assert set(PHRASINGS[PATIENT_TO_PROVIDER]) == set(labels_for(PATIENT_TO_PROVIDER))
    provider = {lab for lab in labels_for(PROVIDER_TO_PATIENT) if lab[0] != "SDOH"}
    assert set(PHRASINGS[PROVIDER_TO_PATIENT]) == provider
    slots = {k: v[0] for k, v in SLOTS.items()}
    for table in PHRASINGS.values():
        for label, templates in table.items():
            assert len(templates) >= 8, label
            assert len(set(templates)) == len(templates), label
            for t in templates:
                assert t.count("[") == 1 and t.count("]") == 1, t
                render(t, slots)  # KeyError on an unknown slot


def test_phrasing_groups_split_50_25_25():
    """Index i -> i % 4: 0, 1 sft; 2 pref; 3 test. 12 templates -> 6 / 3 / 3."""
    assert [phrasing_group(i) for i in range(8)] == ["sft", "sft", "pref", "test"] * 2
    counts = {g: 0 for g in ("sft", "pref", "test")}
    for i in range(12):
        counts[phrasing_group(i)] += 1
    assert counts == {"sft": 6, "pref": 3, "test": 3}


def _slot(m):
    """A regex matching exactly the values of the slot named in a template."""
    return "(?:" + "|".join(re.escape(v) for v in SLOTS[m.group(1)]) + ")"


def _span_patterns(group):
    """(direction, label) -> regexes of the span part of the group's templates."""
    out = {}
    for direction, table in PHRASINGS.items():
        for label, templates in table.items():
            pats = []
            for i, t in enumerate(templates):
                if phrasing_group(i) == group:
                    span = t[t.index("[") + 1 : t.index("]")]
                    pats.append(re.compile(re.sub(r"\\\{(\w+)\\\}", _slot, re.escape(span))))
            out[direction, label] = pats
    return out


@pytest.mark.parametrize("held_out", ["test", "pref"])
def test_held_out_phrasings_never_in_sft(splits, held_out):
    """No span of the sft split fits a template of the held-out group, and every span of
    the split drawn from that group fits one of its templates."""
    patterns = _span_patterns(held_out)
    source = {"test": "test", "pref": "pref"}[held_out]
    for record in splits["sft"]:
        for i in read_completion(record["completion"]):
            key = (record["direction"], (i["Code"], i["Sub-code"]))
            assert not any(p.fullmatch(i["Span"]) for p in patterns[key]), i["Span"]
    for record in splits[source] + (splits["dev"] if held_out == "pref" else []):
        for i in read_completion(record["completion"]):
            key = (record["direction"], (i["Code"], i["Sub-code"]))
            assert any(p.fullmatch(i["Span"]) for p in patterns[key]), i["Span"]


def test_records_are_well_formed(splits):
    """0-3 items, distinct direction-valid labels, spans verbatim and in order of appearance,
    the completion canonical."""
    counts = set()
    for record in _all(splits):
        assert set(record) == {"prompt", "completion", "message", "direction"}
        message, direction = record["message"], record["direction"]
        items = read_completion(record["completion"])
        counts.add(len(items))
        assert record["completion"] == canonical_json(items)
        labels = [(i["Code"], i["Sub-code"]) for i in items]
        assert len(set(labels)) == len(labels)
        at = 0
        for i in items:
            assert is_valid(i["Code"], i["Sub-code"], direction), (i, direction)
            assert i["Span"] and i["Span"] in message
            found = message.find(i["Span"], at)
            assert found >= at, (i["Span"], message)
            at = found + 1
        body = [line for line in message.split("\n") if line]
        assert 1 <= len(body) <= 3
    assert counts == {0, 1, 2, 3}


def test_prompt_names_direction_and_stays_short(splits):
    """Under 1,200 characters (~350 BPE tokens), the direction's code book only."""
    for record in _all(splits):
        prompt = record["prompt"]
        assert len(prompt) <= 1200, len(prompt)
        assert prompt.endswith("Message:\n" + record["message"])
        patient = record["direction"] == PATIENT_TO_PROVIDER
        assert ("from a patient to their provider" in prompt) == patient
        assert ("PartnershipProvider" in prompt) != patient
        assert ("CareCoordinationPatient" in prompt) == patient


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = write_splits(tmp_path / "a", seed=3, sizes=SMALL)
    b = write_splits(tmp_path / "b", seed=3, sizes=SMALL)
    c = write_splits(tmp_path / "c", seed=4, sizes=SMALL)
    assert {p.name for p in a.values()} == {"train.jsonl", "pref.jsonl", "dev.jsonl", "test.jsonl"}
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
        assert a[name].read_bytes() != c[name].read_bytes()
    lines = a["sft"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == SMALL["sft"] and json.loads(lines[0])["direction"]


def test_resizing_one_split_leaves_the_others():
    small = generate_splits(seed=1, sizes={"sft": 10, "pref": 5, "dev": 5, "test": 5})
    other = generate_splits(seed=1, sizes={"sft": 20, "pref": 5, "dev": 5, "test": 5})
    assert other["sft"][:10] == small["sft"]
    assert other["test"] == small["test"]


def test_default_sizes_and_a_full_run():
    assert DEFAULT_SIZES == {"sft": 20000, "pref": 2000, "dev": 300, "test": 300}
    full = generate_splits()
    assert {k: len(v) for k, v in full.items()} == DEFAULT_SIZES
    assert len({r["message"] for r in full["test"]}) > 290


def test_write_jsonl_round_trip(tmp_path):
    records = [{"prompt": "p", "completion": canonical_json([]), "message": "é", "direction": "x"}]
    path = write_jsonl(records, tmp_path / "sub" / "r.jsonl")
    assert path.read_bytes() == (json.dumps(records[0], ensure_ascii=False) + "\n").encode()


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="unknown splits"):
        generate_splits(sizes={"train": 3})


def _words(text):
    return re.findall(r"[A-Za-z][A-Za-z']*", text)


def test_sft_spans_are_perturbed_so_only_copying_reproduces_them(splits):
    """About COPY_PROB of the SFT split's spans fit none of their label's SFT templates (the
    rest of the perturbed half kept every word, the chance of (1 - EDIT_PROB)^words), every
    word of them is of the SFT vocabulary, and they are still verbatim in the message."""
    patterns, vocabulary = _span_patterns("sft"), set(sft_vocabulary())
    spans = [(r, i) for r in splits["sft"] for i in read_completion(r["completion"])]
    unfit = [i["Span"] for r, i in spans
             if not any(p.fullmatch(i["Span"]) for p in
                        patterns[r["direction"], (i["Code"], i["Sub-code"])])]  # fmt: skip
    assert 0.35 < len(unfit) / len(spans) < COPY_PROB, (len(unfit), len(spans))
    assert all(set(_words(s)) <= vocabulary for s in unfit)
    assert all(i["Span"] in r["message"] for r, i in spans)


def test_sft_vocabulary_holds_no_word_of_a_held_out_phrasing(monkeypatch):
    """Every word drawn is a word of unperturbed SFT messages, so a word that only the
    preference or test templates use is never drawn."""
    monkeypatch.setattr(generator, "COPY_PROB", 0.0)
    seen = {w for r in generate_split("sft", 3000, 1) for w in _words(r["message"])}
    held_out = {w for d, table in PHRASINGS.items() for label in table
                for g in ("pref", "test") for t in phrasings(d, g)[label]
                for w in _words(re.sub(r"{\w+}", " ", t))}  # fmt: skip
    assert set(sft_vocabulary()) <= seen, set(sft_vocabulary()) - seen
    assert held_out - seen and not (held_out - seen) & set(sft_vocabulary())


def test_only_the_sft_split_is_perturbed(monkeypatch):
    """Without perturbation the preference, dev and test splits are byte for byte the same
    (they draw nothing for it) and the SFT split's spans all fit their templates."""
    sizes = {"sft": 60, "pref": 30, "dev": 30, "test": 30}
    perturbed = generate_splits(seed=5, sizes=sizes)
    monkeypatch.setattr(generator, "COPY_PROB", 0.0)
    plain = generate_splits(seed=5, sizes=sizes)
    for name in ("pref", "dev", "test"):
        assert plain[name] == perturbed[name], name
    assert plain["sft"] != perturbed["sft"]
    patterns = _span_patterns("sft")
    for r in plain["sft"]:
        for i in read_completion(r["completion"]):
            assert any(p.fullmatch(i["Span"]) for p in
                       patterns[r["direction"], (i["Code"], i["Sub-code"])]), i["Span"]  # fmt: skip


def test_copy_warm_up_answers_are_the_message_copied():
    """Each warm-up answer is the JSON list of the message's sentences, verbatim and in order;
    its words are made of the given pieces only; seeded."""
    pieces = ["ab", "Cd", "e'f", "12", "gh"]
    records = copy_split(200, pieces, seed=3)
    assert records == copy_split(200, pieces, seed=3) != copy_split(200, pieces, seed=4)
    for r in records:
        message = r["prompt"].split("Message:\n", 1)[1]
        sentences = json.loads(r["completion"])
        assert 1 <= len(sentences) <= 4
        assert re.split(r"[.?!][ \n]?", message)[:-1] == sentences, (message, sentences)
        for word in " ".join(sentences).split(" "):
            assert re.fullmatch("(?:ab|Cd|e'f|12|gh){1,2}", word), word


def test_copy_pieces_keep_what_json_copies_verbatim():
    """Token texts with a letter or digit, stripped; none that JSON escapes (quote, backslash)
    or that holds a space inside; no special token once decoding skipped it (empty)."""
    got = copy_pieces([" the", "ing", '"', ' "x', "a\\b", "", " ", "\n", "12", "a b", "'s", "."])
    assert got == ["'s", "12", "ing", "the"]
