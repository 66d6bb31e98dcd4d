"""Per-task classification scores, Dice and the multi-task Ignite metric."""
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from scripts.metrics import MultiTaskMetric, classification_report, dice_per_case


def test_classification_report_matches_hand_counts():
    y = np.array([0, 0, 0, 1, 1])
    prob1 = np.array([0.1, 0.6, 0.2, 0.9, 0.4])  # predictions 0 1 0 1 0 -> tp=1 fn=1 fp=1 tn=2
    r = classification_report(y, np.stack([1 - prob1, prob1], 1))
    assert r["confusion_matrix"] == [[2, 1], [1, 1]]
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["sensitivity"] == pytest.approx(1 / 2)
    assert r["specificity"] == pytest.approx(2 / 3)
    f1_pos, f1_neg = 2 * 1 / (2 * 1 + 1 + 1), 2 * 2 / (2 * 2 + 1 + 1)
    assert r["macro_f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    # AUC: pairs (pos, neg) ranked correctly: 0.9 beats all three; 0.4 beats 0.1 and 0.2 -> 5/6
    assert r["roc_auc"] == pytest.approx(5 / 6)


def test_auc_is_nan_with_one_class():
    r = classification_report(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert math.isnan(r["roc_auc"]) and r["accuracy"] == 0.5


def test_dice_per_case():
    a = torch.zeros(3, 1, 4, 4, 4)
    b = torch.zeros(3, 1, 4, 4, 4)
    a[0, :, :2] = 1
    b[0, :, :2] = 1          # identical -> 1
    a[1, :, :2] = 1
    b[1, :, 1:3] = 1         # half overlap -> 0.5
    d = dice_per_case(a, b)  # case 2 empty in both -> 1
    assert torch.allclose(d, torch.tensor([1.0, 0.5, 1.0]), atol=1e-5)


def _logits(p1):
    p = torch.tensor(p1)
    return torch.stack([torch.log(1 - p), torch.log(p)], 1)


def test_multitask_metric_ignores_missing_labels_and_rows_without_masks():
    tasks = ["a", "b"]
    metric = MultiTaskMetric(tasks)
    engine = Engine(lambda e, b: b)
    engine.state.metric_details = {}
    metric.attach(engine, "val_score")
    seg_logits = torch.zeros(2, 2, 4, 4, 4)
    seg_logits[0, 1, :2] = 5  # case 0 predicts the first half as tumor
    batch = {
        "pred": {"a": _logits([0.9, 0.2]), "b": _logits([0.8, 0.7]), "seg": seg_logits},
        "label": {
            "label": torch.tensor([[1, -1], [0, 1]]),
            "seg": torch.cat([torch.ones(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)]),
            "has_seg": torch.tensor([True, False]),
        },
    }
    metric._output_transform = lambda out: (out["pred"], out["label"])
    engine.run([batch], max_epochs=1)
    m = engine.state.metrics
    assert m["a_accuracy"] == 1.0 and m["b_accuracy"] == 1.0  # task b only sees row 1
    assert engine.state.metric_details["report"]["tasks"]["b"]["n"] == 1
    assert m["dice"] == pytest.approx(2 * 32 / (32 + 64), abs=1e-4)  # only row 0 has a mask
    assert m["val_score"] == pytest.approx(m["dice"] + (m["a_macro_f1"] + m["b_macro_f1"]) / 2)
