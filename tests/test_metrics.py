"""Per-task classification scores, Dice and the multi-task Ignite metric."""
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from scripts.metrics import MultiTaskMetric, classification_report


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


def _dice_report(pred_masks: torch.Tensor, true_masks: torch.Tensor) -> dict:
    """The metric's report for cases of one task (label -1: only the masks count) with these masks."""
    n = len(pred_masks)
    engine = Engine(lambda e, b: b)
    engine.state.metric_details = {}
    MultiTaskMetric(["a"], output_transform=lambda out: (out["pred"], out["label"])).attach(engine, "score")
    seg_logits = torch.stack([1 - pred_masks, pred_masks], 1).float()  # argmax: the predicted mask
    batch = {"pred": {"a": torch.zeros(n, 2), "seg": seg_logits},
             "label": {"label": torch.full((n, 1), -1), "seg": true_masks.unsqueeze(1),
                       "has_seg": torch.ones(n, dtype=torch.bool)}}
    engine.run([batch], max_epochs=1)
    return engine.state.metric_details["report"]


def test_dice_of_each_case_with_empty_masks():
    pred, true = torch.zeros(5, 4, 4, 4), torch.zeros(5, 4, 4, 4)
    pred[0, :2] = true[0, :2] = 1  # identical -> 1
    pred[1, :2] = 1
    true[1, 1:3] = 1               # half overlap -> 0.5
    #                                case 2: both empty -> 1
    pred[3, :2] = 1                # case 3: tumor predicted where there is none -> 0
    true[4, :2] = 1                # case 4: tumor missed -> 0
    report = _dice_report(pred, true)
    assert report["dice_cases"] == 5 and report["dice"] == pytest.approx((1 + 0.5 + 1 + 0 + 0) / 5, abs=1e-6)
    assert _dice_report(pred[2:3], true[2:3])["dice"] == 1.0  # not NaN: an empty case counts as a perfect one


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
