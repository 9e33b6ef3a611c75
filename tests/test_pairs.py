"""The pairs stage's labelling (rsa_pl.pipeline.pairs._pairs), by hand: which answer is chosen and
which rejected, what makes no pair, and the ids and labels the preference stages read."""

from __future__ import annotations

from rsa_pl.data.tokenize import IGNORE_INDEX
from rsa_pl.pipeline.pairs import _pairs


def answer(text: str, ids: list[int], reward: float | None, cost: float | None, unsafe: bool | None) -> dict:
    return {"text": text, "ids": ids, "reward": reward, "cost": cost, "unsafe": unsafe}


def group(prompt: str, answers: list[dict], prompt_ids: tuple[int, ...] = (1, 2)) -> dict:
    return {"prompt": prompt, "prompt_text": f"<{prompt}>", "prompt_ids": list(prompt_ids), "category": "c",
            "answers": answers}  # fmt: skip


GROUPS = [
    group(
        "best and worst",
        [
            answer("mid", [5], 0.5, 1.0, True),
            answer("top", [6, 7], 2.0, -1.0, False),
            answer("low", [8], -1.0, 3.0, True),
            answer("unscored", [9], None, None, None),
        ],
    ),
    group("tie", [answer("a", [5], 1.0, 0.0, False), answer("b", [6], 1.0, 0.0, False)]),
    group("one scored", [answer("a", [5], 1.0, 1.0, None), answer("b", [6], None, None, None)]),
    group("same text", [answer("x", [5], 1.0, 1.0, False), answer("x", [5], 2.0, 2.0, False)]),
]


def test_the_helpful_pair_is_the_highest_reward_over_the_lowest() -> None:
    examples, kept = _pairs(GROUPS, "reward", higher=True, max_length=16)
    assert kept == {"pairs": 1, "ties": 1, "too_few_scored": 1, "identical": 1}
    (row,) = examples
    assert (row["prompt"], row["prompt_text"], row["category"]) == ("best and worst", "<best and worst>", "c")
    assert (row["chosen"], row["rejected"]) == ("top", "low")
    assert (row["is_chosen_safe"], row["is_rejected_safe"]) == (True, False)
    assert row["chosen_input_ids"] == [1, 2, 6, 7]
    assert row["chosen_labels"] == [IGNORE_INDEX, IGNORE_INDEX, 6, 7]
    assert row["rejected_input_ids"] == [1, 2, 8]
    assert row["rejected_labels"] == [IGNORE_INDEX, IGNORE_INDEX, 8]


def test_the_safety_pair_is_the_lowest_cost_over_the_highest() -> None:
    examples, kept = _pairs(GROUPS, "cost", higher=False, max_length=16)
    assert kept == {"pairs": 1, "ties": 1, "too_few_scored": 1, "identical": 1}
    assert (examples[0]["chosen"], examples[0]["rejected"]) == ("top", "low")
    swapped = [group("p", [answer("safe", [5], 9.0, -2.0, False), answer("harmful", [6], 1.0, 5.0, True)])]
    by_cost, _ = _pairs(swapped, "cost", higher=False, max_length=16)
    by_reward, _ = _pairs(swapped, "reward", higher=True, max_length=16)
    assert (by_cost[0]["chosen"], by_reward[0]["chosen"]) == ("safe", "safe")
    unknown = [group("p", [answer("a", [5], 1.0, 1.0, None), answer("b", [6], 0.0, 0.0, None)])]
    assert _pairs(unknown, "cost", higher=False, max_length=16)[0][0]["is_chosen_safe"] is None


def test_responses_are_cut_to_the_room_the_prompt_leaves() -> None:
    long = [group("p", [answer("long", [5, 6, 7, 8], 2.0, 0.0, False), answer("short", [9], 1.0, 0.0, False)],
                  prompt_ids=(1, 2, 3))]  # fmt: skip
    (row,), _ = _pairs(long, "reward", higher=True, max_length=5)
    assert row["chosen_input_ids"] == [1, 2, 3, 5, 6]
    assert row["chosen_labels"] == [IGNORE_INDEX] * 3 + [5, 6]
    assert row["rejected_input_ids"] == [1, 2, 3, 9]
