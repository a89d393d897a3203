"""Audit: do the Middo signals find known defects in *your* data, before you spend GPU hours on it?

``middo audit`` copies the configured data, injects defects of known kinds into a fraction of the rows
(:func:`inject_defects`), runs the real diagnosis and selection on the copy, and measures per axis how
well the signals (AUROC) and the flags (precision, recall) separate the injected defects from the
untouched rows (:func:`audit_metrics`). Nothing is written back to the data; the loop is not run.

- ``middo_ray.audit.inject``: the defect kinds and :func:`inject_defects`;
- ``middo_ray.audit.metrics``: AUROC, precision/recall, the per-axis suspicion scores and :func:`audit_metrics`;
- ``middo_ray.audit.report``: the plain-text table (:func:`format_report`) and JSON-ready values;
- ``middo_ray.audit.run``: :func:`run_audit`, the driver (diagnosis on Ray, files written).
"""

from middo_ray.audit.inject import (DEFAULT_KINDS, KIND_DESCRIPTIONS, MAX_FRACTION, NON_ANSWERS, AuditError,
                                    check_audit_args, inject_defects)
from middo_ray.audit.metrics import (SIGNALS, Auroc, PrecisionRecall, audit_metrics, auroc, average_ranks,
                                     axis_scores, max_similarity, precision_recall)
from middo_ray.audit.report import format_report
from middo_ray.audit.run import DEFAULT_DUP_THRESHOLD, default_out_dir, run_audit

__all__ = ["DEFAULT_DUP_THRESHOLD", "DEFAULT_KINDS", "KIND_DESCRIPTIONS", "MAX_FRACTION", "NON_ANSWERS", "SIGNALS",
           "AuditError", "Auroc", "PrecisionRecall", "audit_metrics", "auroc", "average_ranks", "axis_scores",
           "check_audit_args", "default_out_dir", "max_similarity", "format_report", "inject_defects",
           "precision_recall", "run_audit"]
