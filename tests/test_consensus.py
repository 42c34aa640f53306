"""The consensus of a question's candidates (train/consensus.py, data/answers.py): answers compared as numbers, the
three features against hand-worked values, the regression at its optimum, and the judge's rows and thresholds."""
import json

import numpy as np
import pandas as pd
import pytest

from common.errors import UserError
from data.answers import answer_key, candidate_groups
from train.calibrate import apply_temperature, decision_in_use, load_decision, logit, save_decision
from train.consensus import (FEATURES, MIN_ROWS, RIDGE, consensus_features, fit_consensus, fit_judge, fit_logistic,
                             judge)
from train.loop import whole_questions
from train.metrics import auroc


@pytest.mark.parametrize("same", [("1,200", "$1200", "1200.0", "1.2E3", " 1200 "), ("0.50", ".5"), ("-0", "0"),
                                  ("Ten Apples", "ten  apples")])
def test_equal_answers_share_a_key(same):
    assert len({answer_key(a) for a in same}) == 1


@pytest.mark.parametrize("same", [("1e1000000", "10e999999"), ("-$5", "-5.00")])
def test_exact_numbers_of_any_size_share_a_key(same):
    assert len({answer_key(a) for a in same}) == 1 and len(answer_key(same[0])) < 20


@pytest.mark.parametrize("different", [("12", "120"), ("1.5", "15"), ("nan", "NaN apples"), ("-3", "3"), ("", "0"),
                                       ("2, 3", "23"), ("3,5", "35"), ("1 2", "12"), (str(2**100), str(2**100 + 1)),
                                       ("1e-999999999", "0", "-1e-999999999")])
def test_different_answers_keep_different_keys(different):
    assert len({answer_key(a) for a in different}) == len(different)


def test_candidate_groups_by_question_text_with_empty_answers_agreeing_with_none():
    questions = ["How many?", "How  many? ", "Why?", "How many?", "Why?"]
    answers = ["3", "3.0", "3", "", ""]
    question_ids, answer_ids = candidate_groups(questions, answers)
    assert question_ids.tolist() == [0, 0, 1, 0, 1]
    assert answer_ids[0] == answer_ids[1] != answer_ids[2]  # the same "3" of another question is another answer
    assert answer_ids[3] == answer_ids[4] == -1


def test_features_on_a_hand_worked_table():
    questions = ["a", "a", "a", "a", "b", "b", "c"]
    answers = ["5", "5", "6", "", "1", "2", "9"]
    p_true = np.array([0.8, 0.4, 0.6, 0.2, 0.3, 0.3, 0.9])
    x, has_peers = consensus_features(p_true, questions, answers)
    assert has_peers.tolist() == [True] * 6 + [False]
    np.testing.assert_allclose(x[:, 0], logit(p_true))
    np.testing.assert_allclose(x[:, 1], [1 / 3, 1 / 3, 0, 0, 0, 0, 0])  # others of its question with its answer
    np.testing.assert_allclose(x[:, 2], [1.2 / 2, 1.2 / 2, 0.6 / 2, 0.2 / 2, 0.5, 0.5, 1.0])  # its answer's P share
    assert FEATURES == ("logit", "agree", "vote")


def test_questions_whose_answers_are_all_empty_are_judged_without_error():
    p_true = np.array([0.2, 0.5, 0.9])
    x, has_peers = consensus_features(p_true, ["a", "a", "b"], ["", "", ""])
    assert has_peers.tolist() == [True, True, False] and (x[:, 1] == 0).all() and np.isfinite(x).all()
    np.testing.assert_allclose(x[:2, 2], [0.2 / 0.7, 0.5 / 0.7])  # each empty answer holds its own P(True) alone
    p, labels, questions, answers = agreeing_table()
    judged, _, _ = judge(p, fit_judge(p, labels, questions, answers), questions, np.full(len(p), ""))
    assert np.isfinite(judged).all()


def test_logistic_fit_is_at_the_penalized_optimum_and_recovers_known_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 3))
    truth, bias = np.array([1.5, -2.0, 0.5]), 0.3
    y = rng.random(len(x)) < 1 / (1 + np.exp(-(x @ truth + bias)))
    weights, fitted_bias = fit_logistic(x, y)
    np.testing.assert_allclose(weights, truth, atol=0.08)
    assert abs(fitted_bias - bias) < 0.08
    p = 1 / (1 + np.exp(-(x @ weights + fitted_bias)))
    gradient = np.r_[x.T @ (p - y) / len(y) + RIDGE * weights, np.mean(p - y)]
    assert np.abs(gradient).max() < 1e-9


def test_separable_labels_give_finite_weights():
    x = np.array([[-2.0, 0, 0], [-1.0, 0, 0], [1.0, 1, 1], [2.0, 1, 1]])
    weights, bias = fit_logistic(x, np.array([0, 0, 1, 1]))
    assert np.isfinite(weights).all() and np.isfinite(bias)


def agreeing_table(groups: int = 60, seed: int = 0):
    """Four candidates per question; a correct answer is shared by the correct candidates, wrong ones scatter; the
    model's P(True) is barely informative, so agreement carries the signal."""
    rng = np.random.default_rng(seed)
    questions, answers, labels = [], [], []
    for g in range(groups):
        correct = rng.random(4) < 0.4
        for i, right in enumerate(correct):
            questions.append(f"question {g}")
            answers.append("42" if right else str(100 + rng.integers(0, 1000)))
            labels.append(right)
    labels = np.array(labels)
    p_true = np.clip(0.5 + 0.1 * (labels - 0.5) + rng.normal(0, 0.2, len(labels)), 0.01, 0.99)
    return p_true, labels, np.array(questions), np.array(answers)


def test_fitted_consensus_outranks_the_model_alone_where_answers_agree():
    p_true, labels, questions, answers = agreeing_table()
    decision = fit_judge(p_true, labels, questions, answers)
    fitted = decision["consensus"]
    assert fitted["rows"] == len(labels) and fitted["weights"]["agree"] > 0
    judged, thresholds, by_consensus = judge(p_true, decision, questions, answers)
    assert by_consensus.all() and (thresholds == fitted["threshold"]).all()
    assert auroc(judged, labels) > auroc(p_true, labels) + 0.15
    assert np.mean((judged >= thresholds) == labels) > 0.85


def test_rows_alone_with_their_question_keep_the_calibrated_model():
    p_true, labels, questions, answers = agreeing_table()
    decision = fit_judge(p_true, labels, questions, answers)
    alone = np.array([0.2, 0.7])
    judged, thresholds, by_consensus = judge(alone, decision, ["only once", "another"], ["1", "2"])
    assert not by_consensus.any() and (thresholds == decision["threshold"]).all()
    np.testing.assert_allclose(judged, apply_temperature(alone, decision["temperature"]))
    judged, _, _ = judge(p_true, decision)  # no questions given: no consensus
    np.testing.assert_allclose(judged, apply_temperature(p_true, decision["temperature"]))


def test_no_consensus_from_too_few_rows_with_peers_or_one_label():
    p_true, labels, questions, answers = agreeing_table(groups=MIN_ROWS // 4 - 1)
    assert fit_consensus(p_true, labels, questions, answers) is None
    p_true, labels, questions, answers = agreeing_table()
    assert fit_consensus(p_true, np.ones_like(labels), questions, answers) is None
    assert "consensus" not in fit_judge(p_true, labels)


def test_a_decision_with_consensus_round_trips_and_the_flags_override_it(tmp_path):
    p_true, labels, questions, answers = agreeing_table()
    save_decision(tmp_path, fit_judge(p_true, labels, questions, answers))
    stored = load_decision(tmp_path)
    decision, used = decision_in_use(tmp_path)
    assert decision["consensus"] == stored["consensus"] and "consensus of answers" in used
    decision, used = decision_in_use(tmp_path, threshold=0.25)
    assert decision["threshold"] == decision["consensus"]["threshold"] == 0.25
    decision, used = decision_in_use(tmp_path, consensus=False)
    assert "consensus" not in decision and "consensus of answers" not in used


@pytest.mark.parametrize("consensus, message", [
    ({"weights": {"logit": 1.0, "agree": 2.0}, "bias": 0.0, "threshold": 0.5}, "must hold finite 'weights'"),
    ({"weights": {"logit": 1.0, "agree": 2.0, "vote": float("nan")}, "bias": 0, "threshold": 0.5}, "finite"),
    ({"weights": {"logit": 1.0, "agree": 2.0, "vote": 1.0}, "bias": 0.0, "threshold": 1.5}, r"in \[0, 1\]"),
    ("yes", "must hold finite"),
    ({"weights": {"logit": 1.0, "agree": 2.0, "vote": 1.0, "note": "hand-tuned"}, "bias": 0.0, "threshold": 0.5},
     "must hold finite 'weights'"),
    ({"weights": {"logit": 1.0, "agree": 2.0, "vote": 1.0}, "bias": 10 ** 400, "threshold": 0.5}, "finite"),
])
def test_a_malformed_consensus_is_one_line_naming_the_file(tmp_path, consensus, message):
    (tmp_path / "decision.json").write_text(json.dumps({"temperature": 1.0, "threshold": 0.5,
                                                        "consensus": consensus}))
    with pytest.raises(UserError, match=message) as caught:
        load_decision(tmp_path)
    assert str(tmp_path / "decision.json") in str(caught.value) and "\n" not in str(caught.value)


def test_a_consensus_is_fitted_on_the_validation_questions_no_training_row_asks():
    df = pd.DataFrame({"question": ["a", "a", "b", "b ", "c", "c"], "answer": ["1", "2", "3", "3", "4", "5"]})
    questions, answers = whole_questions(df, np.array([0, 1]), np.array([2, 3, 4, 5]), say=False)
    assert questions.tolist() == ["b", "b ", "c", "c"] and answers.tolist() == ["3", "3", "4", "5"]
    questions, _ = whole_questions(df, np.array([0, 2]), np.array([1, 3, 4, 5]), say=False)
    _, has_peers = consensus_features(np.full(4, 0.5), questions, answers)
    assert has_peers.tolist() == [False, False, True, True]  # "a" and "b" are split: their rows stand alone
