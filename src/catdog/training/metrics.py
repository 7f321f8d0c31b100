"""Classification metrics from true labels and predicted probabilities (scikit-learn does the arithmetic)."""

from __future__ import annotations

import numpy as np


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    """accuracy, per-class precision/recall/F1/support, macro F1, confusion matrix (rows: true, columns: predicted),
    ROC AUC (binary: of the second class; multi-class: one-vs-rest macro) and log loss."""
    from sklearn import metrics as sk  # imported here: scikit-learn costs ~2 s at start-up, most commands never need it
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)  # float32 softmax rounding
    predictions = probabilities.argmax(axis=1)
    indices = list(range(len(class_names)))
    precision, recall, f1, support = sk.precision_recall_fscore_support(labels, predictions, labels=indices, zero_division=0)
    result = {
        "count": int(len(labels)),
        "accuracy": float(sk.accuracy_score(labels, predictions)),
        "log_loss": float(sk.log_loss(labels, np.clip(probabilities, 1e-15, 1.0), labels=indices)),
        "macro_f1": float(np.mean(f1)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": sk.confusion_matrix(labels, predictions, labels=indices).tolist(),
        "class_names": list(class_names),
    }
    present = np.unique(labels)
    if len(present) == len(class_names):
        if len(class_names) == 2:
            result["roc_auc"] = float(sk.roc_auc_score(labels, probabilities[:, 1]))
        else:
            result["roc_auc"] = float(sk.roc_auc_score(labels, probabilities, multi_class="ovr", labels=indices))
    return result
