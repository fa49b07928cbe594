"""kerasdet.evaluation: COCO box and mask evaluation through pycocotools, class-agnostic
proposal recall, VOC07/VOC12 mAP, a Keras callback, chosen by a ``metric`` string
(``"coco"``, ``"coco_segm"``, ``"proposals"``, ``"proposals_segm"``, ``"voc07"``,
``"voc12"``).

``coco_eval``, ``proposal_recall``, ``metrics`` and ``voc_ap`` need only
numpy/pycocotools (and OpenCV to resize masks); ``callback`` imports Keras.

The VOC AP function is reached as ``kerasdet.evaluation.voc_ap.voc_ap`` (or ``from
kerasdet.evaluation.voc_ap import voc_ap``): it is deliberately not re-exported here, since
a package attribute named ``voc_ap`` would shadow the ``voc_ap`` module.
"""
from kerasdet.evaluation.coco_eval import (
    MASK_STAT_KEYS,
    STAT_KEYS,
    CocoEvaluator,
    detections_to_coco_results,
    evaluate_results_file,
    format_table,
    run_cocoeval,
)
from kerasdet.evaluation.proposal_recall import (
    MASK_PROPOSAL_STAT_KEYS,
    PROPOSAL_STAT_KEYS,
    ProposalRecallEvaluator,
    run_proposal_recall,
)
from kerasdet.evaluation.metrics import (
    METRICS,
    VocEvaluator,
    format_stats,
    make_evaluator,
    primary_key,
)
from kerasdet.evaluation.callback import CocoEvalCallback, DetectionEvalCallback, evaluate_model
from kerasdet.evaluation import voc_ap  # the module (see above)
from kerasdet.evaluation.voc_ap import voc_eval

__all__ = [
    "MASK_PROPOSAL_STAT_KEYS",
    "MASK_STAT_KEYS",
    "METRICS",
    "PROPOSAL_STAT_KEYS",
    "ProposalRecallEvaluator",
    "run_proposal_recall",
    "STAT_KEYS",
    "CocoEvalCallback",
    "CocoEvaluator",
    "DetectionEvalCallback",
    "VocEvaluator",
    "format_stats",
    "make_evaluator",
    "primary_key",
    "detections_to_coco_results",
    "evaluate_model",
    "evaluate_results_file",
    "format_table",
    "run_cocoeval",
    "voc_ap",
    "voc_eval",
]
