"""Text rewards against hand-computed values: format, rec_format, mcq, yes_no, all_match, fuzzy, math, accuracy,
repetition, cosine_length."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_vlmr1.rewards import get_reward
from megatron_vlmr1.rewards.text import cosine_schedule, extract_choice, lcs_length, similarity


def score(name, completion, **fields):
    return get_reward(name)([completion], **{k: [v] for k, v in fields.items()})[0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>reasoning</think><answer>42</answer>", 1.0),
        ("<think></think><answer></answer>", 1.0),  # empty contents are allowed
        ("  \n<think>a</think>\n\n<answer>b</answer>\n", 1.0),  # whitespace around and between
        ("<think>a</think> x <answer>b</answer>", 0.0),  # text between the blocks
        ("<answer>b</answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("<think>a</think><answer>b</answer> trailing", 0.0),
        ("preamble <think>a</think><answer>b</answer>", 0.0),
        ("<answer>b</answer><think>a</think>", 0.0),
        ("<think>a</think><answer>b</answer><think>c</think><answer>d</answer>", 0.0),  # VLM-R1's regex accepts this
        ("<think>a<think>b</think><answer>c</answer>", 0.0),
        ("<think>a</think><answer>b", 0.0),
    ],
)
def test_format(text, expected):
    assert score("format", text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<think>a</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 1.0),
        ("<think>a</think><answer>[1, 2, 3, 4]</answer>", 1.0),
        ('<think>a</think><answer>[{"bbox_2d": [1, 2, 3, 4], "label": "x"}]</answer>', 1.0),
        ("<think>a</think><answer>the box is 1 2 3 4</answer>", 0.0),
        ("<think>a</think><answer>[1, 2, 3]</answer>", 0.0),
        ('<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 0.0),  # box but no think block
    ],
)
def test_rec_format(text, expected):
    assert score("rec_format", text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("B", "B"), ("(C)", "C"), ("The answer is C.", "C"), ("I think A.", "A"), ("A. cat", "A"), ("I think so", None),
     ("A or B? I pick D", "D"), ("", None)],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_mcq():
    assert score("mcq", "<think>t</think><answer>The answer is B.</answer>", solution="B") == 1.0
    assert score("mcq", "<answer>(B)</answer>", solution="<answer>B</answer>") == 1.0
    assert score("mcq", "<answer>C</answer>", solution="B") == 0.0
    assert score("mcq", "<answer>no letter here</answer>", solution="B") == 0.0


def test_yes_no():
    assert score("yes_no", "<answer>Yes, it is.</answer>", solution="yes") == 1.0
    assert score("yes_no", "<answer>No.</answer>", solution="<answer>no</answer>") == 1.0
    assert score("yes_no", "<answer>yes</answer>", solution="no") == 0.0
    assert score("yes_no", "<answer>I do not know</answer>", solution="no") == 0.0  # "not", "know" are not "no"


def test_all_match():
    assert score("all_match", "<think>t</think><answer> Paris. </answer>", solution="paris") == 1.0
    assert score("all_match", "<answer>New\nYork</answer>", solution="new york") == 1.0
    assert score("all_match", "<answer>Paris, France</answer>", solution="paris") == 0.0


def test_fuzzy_is_levenshtein_ratio():
    # python-Levenshtein's ratio("kitten", "sitting") = 1 - indel/(6 + 7) = 2·LCS/13 with LCS "ittn" = 4.
    assert similarity("kitten", "sitting") == pytest.approx(8 / 13)
    assert score("fuzzy", "<answer>Kitten</answer>", solution="sitting") == pytest.approx(8 / 13)
    assert score("fuzzy", "<answer>same</answer>", solution="SAME.") == 1.0
    assert score("fuzzy", "<answer>abc</answer>", solution="xyz") == 0.0


def _lcs_reference(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, ca in enumerate(a):
        for j, cb in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if ca == cb else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcé\n ", max_size=40), st.text(alphabet="abcé\n ", max_size=40))
def test_bit_parallel_lcs_matches_dynamic_programming(a, b):
    assert lcs_length(a, b) == _lcs_reference(a, b)


def test_math():
    assert score("math", "<think>t</think><answer>\\boxed{2}</answer>", solution="2") == 1.0
    assert score("math", "<answer>$\\frac{1}{2}$</answer>", solution="0.5") == 1.0
    assert score("math", "<answer>3</answer>", solution="2") == 0.0
    assert score("math", "<answer>2</answer>", solution="no math here") == 0.0


def test_accuracy_dispatches_on_accu_reward_method():
    assert score("accuracy", "<answer>B</answer>", solution="B", accu_reward_method="mcq") == 1.0
    assert score("accuracy", "<answer>yes</answer>", solution="yes", accu_reward_method="yes_no") == 1.0
    assert score("accuracy", "<answer>[0, 0, 10, 5]</answer>", solution=[0, 0, 10, 10], accu_reward_method="iou") == 0.5
    # default: math-verify, then exact numbers, then option letters, then fuzzy text.
    assert score("accuracy", "<answer>42</answer>", solution="42") == 1.0
    assert score("accuracy", "<answer>41</answer>", solution="42", accu_reward_method="default") == 0.0
    assert score("accuracy", "<answer>kitten</answer>", solution="sitting") == pytest.approx(8 / 13)


def test_accuracy_accepts_our_ovd_names_and_vlm_r1s():
    cat, dog = {"bbox_2d": [0, 0, 10, 10], "label": "cat"}, {"bbox_2d": [20, 20, 30, 30], "label": "dog"}
    answer = "<answer>" + json.dumps([cat, dog]) + "</answer>"
    solution = "<answer>" + json.dumps([cat]) + "</answer>"
    # AP is 1.0 (the only GT box is found); two predictions for one GT halve it under the redundancy penalty.
    for method in ("map_len", "odLength"):
        assert score("accuracy", answer, solution=solution, accu_reward_method=method) == pytest.approx(0.5), method
    for method in ("ap", "od_ap", "map", "ap50", "od_ap50"):
        assert score("accuracy", answer, solution=solution, accu_reward_method=method) == pytest.approx(1.0), method
    with pytest.raises(ValueError, match="accu_reward_method 'mapp' is unknown"):
        score("accuracy", answer, solution=solution, accu_reward_method="mapp")


def test_repetition():
    assert score("repetition", "a b c d e f g") == 0.0  # two distinct 6-grams
    assert score("repetition", "a a a a a a a a") == pytest.approx(-2 / 3)  # three 6-grams, one distinct
    assert score("repetition", "too short") == 0.0
    box = {"bbox_2d": [1, 2, 3, 4], "label": "x"}
    other = {"bbox_2d": [5, 6, 7, 8], "label": "x"}
    assert score("repetition", "<answer>" + json.dumps([box, box, other]) + "</answer>") == pytest.approx(-1 / 3)


def test_repetition_scores_a_looping_think_even_with_one_rec_box():
    # Words: "<think>i", 1599 loop words, then '</think><answer>{"bbox_2d":' and the box's 4 words: 1605 words,
    # 1600 6-grams. Distinct: the loop's 4 (period 4), the one holding "<think>i", and the 5 holding the
    # "</think>..." word (the answer's words only occur after it) → 10.
    loop = "<think>" + "I will look again. " * 400 + "</think>"
    rec = '<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>'
    assert score("repetition", loop + rec) == pytest.approx(10 / 1600 - 1)
    # A bare box: "</think><answer>[1," and 3 more words: 1604 words, 1599 6-grams; only 4 6-grams hold word 1600
    # (it is 4 words from the end), so 4 + 1 + 4 = 9 distinct.
    assert score("repetition", loop + "<answer>[1, 2, 3, 4]</answer>") == pytest.approx(9 / 1599 - 1)
    # A REC box with a short, non-repeating trace is not penalised.
    assert score("repetition", '<think>the red disc</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>') == 0.0


def test_repetition_counts_objects_only_for_ovd_lists():
    box = {"bbox_2d": [1, 2, 3, 4], "label": "x"}
    # OVD list: 1-grams of objects, the loop in <think> is not scored (VLM-R1 scores the answer's objects only).
    ovd = "<think>" + "a b " * 20 + "</think><answer>" + json.dumps([box, box]) + "</answer>"
    assert score("repetition", ovd) == pytest.approx(-1 / 2)
    # A list of bare boxes or of objects without labels is text: 6-grams over the whole completion.
    bare = "<answer>" + json.dumps([[1, 2, 3, 4]] * 3) + "</answer>"
    assert score("repetition", bare) == pytest.approx(len(set(ngrams(bare, 6))) / len(ngrams(bare, 6)) - 1)
    unlabeled = "<answer>" + json.dumps([{"bbox_2d": [1, 2, 3, 4]}] * 2) + "</answer>"
    assert score("repetition", unlabeled) == pytest.approx(
        len(set(ngrams(unlabeled, 6))) / len(ngrams(unlabeled, 6)) - 1)


def ngrams(text, n):
    words = text.lower().split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def test_cosine_schedule_endpoints():
    assert cosine_schedule(0, 100, 1.0, 0.5) == 1.0
    assert cosine_schedule(50, 100, 1.0, 0.5) == pytest.approx(0.75)
    assert cosine_schedule(100, 100, 1.0, 0.5) == pytest.approx(0.5)
    assert cosine_schedule(1e9, 100, 1.0, 0.5) == pytest.approx(0.5)


def test_cosine_length_uses_the_real_accuracy():
    right = "<answer>paris</answer>"
    wrong = "<answer>rome</answer>"
    fields = dict(solution="paris", accu_reward_method="all_match", cosine_max_len=100)
    assert score("cosine_length", right, completion_length=0, **fields) == pytest.approx(1.0)
    assert score("cosine_length", right, completion_length=50, **fields) == pytest.approx(0.75)
    assert score("cosine_length", right, completion_length=100, **fields) == pytest.approx(0.5)
    # A wrong answer is not rewarded as correct (VLM-R1's version forces accuracy to 1.0).
    assert score("cosine_length", wrong, completion_length=0, **fields) == pytest.approx(-0.5)
    assert score("cosine_length", wrong, completion_length=50, **fields) == pytest.approx(-0.25)
    assert score("cosine_length", wrong, completion_length=400, **fields) == pytest.approx(0.0)
    # Without completion_length, whitespace words are counted: "<answer>paris</answer>" is one word.
    expected = 0.5 + 0.5 * (1 + math.cos(math.pi / 100)) / 2
    assert score("cosine_length", right, **fields) == pytest.approx(expected)


def test_cosine_length_field_errors_raise():
    with pytest.raises(ValueError, match="completion_length"):
        score("cosine_length", "x", solution="x", completion_length="long")
    with pytest.raises(ValueError, match="cosine_max_len"):
        score("cosine_length", "x", solution="x", cosine_max_len=0)
