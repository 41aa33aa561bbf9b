import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from normres.evaluate import classification_metrics, confusion_matrix
from normres.evaluate import EvalResult


def result(pred):
    return EvalResult(loss=0.5, accuracy=float("nan"), predictions=pred, confidence=torch.ones(len(pred)))


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn(seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 7, (300,), generator=g)  # classes 7-9 never occur ...
    p = torch.where(torch.rand(300, generator=g) < 0.6, y, torch.randint(0, 9, (300,), generator=g))  # ... 9 never predicted
    m = classification_metrics(y, result(p), num_classes=10)
    every = list(range(10))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["micro_f1"] == pytest.approx(f1_score(y, p, average="micro", labels=every, zero_division=0))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", labels=every, zero_division=0))
    assert m["loss"] == 0.5


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_perfect_and_empty_cases():
    y = torch.tensor([0, 1, 2])
    assert classification_metrics(y, result(y), 3)["macro_f1"] == 1.0
    assert classification_metrics(y, result(y), 4)["macro_f1"] == pytest.approx(0.75)  # class 3: 0/0 -> 0
