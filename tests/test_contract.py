"""The rules the core decides once for every backend (tabpo.training.backend,
tabpo.training.reference, tabpo.data.layout), checked without any backend."""

from __future__ import annotations

import numpy as np
import pytest

from tabpo import losses
from tabpo.common.errors import TabpoError
from tabpo.data import layout as layout_module
from tabpo.data.batching import collate
from tabpo.data.encoding import EncodedPair
from tabpo.data.layout import head_chunks, place, plain_layout
from tabpo.training import reference
from tabpo.training.backend import LoraSettings, ModelOptions, StepResult


def pair(index: int, prompt: list[int], chosen: list[int], rejected: list[int]) -> EncodedPair:
    return EncodedPair(index, index + 1, prompt, chosen, rejected,
                       np.ones(len(chosen)), np.ones(len(rejected)))  # fmt: skip


BATCH = collate([pair(0, [5, 6, 7], [8, 9], [8, 4, 4]), pair(1, [5], [1, 2, 3], [3])], pad_id=0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "int8"}, "--dtype must be one of float32, bfloat16, float16, float64"),
        ({"finetune": "qlora"}, "--finetune must be one of lora, full"),
        ({"prefix_sharing": "always"}, "--prefix-sharing must be one of auto, on, off"),
        ({"ref_path": "ref"}, "--ref-model is for full fine-tuning"),
    ],
)
def test_model_options_are_checked_when_built(options, message):
    with pytest.raises(TabpoError, match=message):
        ModelOptions("model", **options)


def test_a_reference_model_goes_with_full_fine_tuning():
    assert ModelOptions("model", finetune="full", ref_path="ref").ref_path == "ref"


def test_lora_targets_are_named_against_the_models_layers():
    lora = LoraSettings(target_modules=("q_proj", "xyz"))
    with pytest.raises(TabpoError, match=r"'xyz' is not in the model \(its linear layers: "
                       r"q_proj, v_proj\)"):  # fmt: skip
        lora.check_targets({"v_proj", "q_proj"})
    LoraSettings(target_modules=("q_proj",)).check_targets({"q_proj", "v_proj"})
    with pytest.raises(TabpoError, match="at least one target"):
        LoraSettings(target_modules=()).check_targets({"q_proj"})


@pytest.mark.parametrize(
    "options, where",
    [
        ({}, reference.ADAPTER_OFF),
        ({"finetune": "full", "ref_path": "ref"}, reference.SEPARATE),
        ({"finetune": "full"}, reference.INITIAL_COPY),
        ({"finetune": "full", "keep_reference": False}, reference.ABSENT),
    ],
)
def test_where_the_reference_comes_from(options, where):
    assert reference.source(ModelOptions("model", **options)) == where


@pytest.mark.parametrize(
    "loss, given, use",
    [
        ("dpo", None, reference.RUN),
        ("dpo", "given", reference.GIVEN),
        ("tabpo", "given", reference.GIVEN),
        ("tdpo", "given", reference.KL),  # a KL needs the reference's full distributions
        ("tdpo", None, reference.KL),
        ("simpo", "given", reference.NONE),
        ("sft", None, reference.NONE),
    ],
)
def test_when_a_step_runs_the_reference(loss, given, use):
    assert reference.reference_use(losses.get(loss).bind(), given) == use


def test_precomputed_log_probs_must_have_the_batch_shape():
    b, t = BATCH.chosen_ids.shape
    reference.check_given(BATCH, (np.zeros((b, t)), np.zeros((b, t))))
    with pytest.raises(TabpoError, match=rf"shapes \[\({b}, {t}\), \({b}, {t - 1}\)\], "
                       rf"the batch \({b}, {t}\)"):  # fmt: skip
        reference.check_given(BATCH, (np.zeros((b, t)), np.zeros((b, t - 1))))


def test_place_puts_each_value_where_it_belongs():
    """Values [1, 2, 3]; placement [0, 1, 3 | 3, 0, 2] reads [0, 1, 2, 3] at those indices:
    [[0, 1, 3], [3, 0, 2]] (value 3 placed twice, as a token both sides share)."""
    got = place(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 3, 3, 0, 2]), (2, 3))
    np.testing.assert_array_equal(got, [[0.0, 1.0, 3.0], [3.0, 0.0, 2.0]])


def test_place_sums_the_gradient_of_a_value_placed_twice():
    """d/dv of sum(out * W) with W = [[1, 2, 3], [4, 5, 6]]: v1 at (0,1) gets 2, v2 at
    (1,2) gets 6, v3 at (0,2) and (1,0) gets 3 + 4 = 7."""
    torch = pytest.importorskip("torch")
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = place(values, torch.tensor([0, 1, 3, 3, 0, 2]), (2, 3))
    (out * torch.arange(1.0, 7.0).reshape(2, 3)).sum().backward()
    assert values.grad.tolist() == [2.0, 6.0, 7.0]


def test_plain_placement_covers_exactly_the_completion_tokens():
    lay = plain_layout(BATCH)
    mask = np.concatenate([BATCH.chosen_mask, BATCH.rejected_mask]).ravel()
    np.testing.assert_array_equal(lay.placement > 0, mask > 0)
    values = np.arange(1.0, len(lay.targets.target_ids) + 1)
    placed = place(values, lay.placement, lay.shape)
    assert sorted(placed[placed > 0].tolist()) == values.tolist()


def test_head_chunks_cover_every_row_once_within_the_budget(monkeypatch):
    monkeypatch.setattr(layout_module, "LOGITS_PER_CHUNK", 70)  # 7 rows of a 10-word vocab
    assert head_chunks(20, 10) == [slice(0, 7), slice(7, 14), slice(14, 20)]
    assert head_chunks(0, 10) == []
    assert head_chunks(3, 1000) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # at least a row


def test_step_result_from_a_backends_arrays():
    result = StepResult.of(BATCH, np.float32(0.5), np.array([0.25, 0.75]),
                           {"rewards/margins": np.float32(2.0)}, np.asarray)  # fmt: skip
    assert (result.loss, result.metrics, result.tokens) == (0.5, {"rewards/margins": 2.0},
                                                            BATCH.tokens)  # fmt: skip
    np.testing.assert_array_equal(result.per_pair, [0.25, 0.75])
