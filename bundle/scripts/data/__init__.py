"""Glioma data: datalist, bad-input pass, transforms, task-balanced loading, demo cohort."""
from .datalist import IMAGE_KEYS, SEG_KEY, SPLITS, TASKS, load_datalist, read_datalist, write_datalist
from .demo_cohort import ensure_demo_cohort, generate_cohort
from .discovery import find_cases
from .loader import TaskBalancedLoader, TaskRows, collate_rows, make_dataset, segmentation_loader
from .sampler import TaskBalancedBatchSampler
from .transforms import (
    BinarizeMaskd,
    BrainZScored,
    EnsureMaskd,
    OrientLiked,
    TaskLabelsd,
    augmentation,
    preprocessing,
    preprocessing_transforms,
)
from .validate import DatalistError, check_case, validate_datalist

__all__ = [
    "IMAGE_KEYS", "SEG_KEY", "SPLITS", "TASKS", "load_datalist", "read_datalist", "write_datalist",
    "find_cases", "ensure_demo_cohort", "generate_cohort", "TaskBalancedLoader", "TaskRows", "collate_rows",
    "make_dataset",
    "segmentation_loader", "TaskBalancedBatchSampler", "BinarizeMaskd", "BrainZScored", "EnsureMaskd", "OrientLiked",
    "TaskLabelsd", "augmentation", "preprocessing", "preprocessing_transforms", "DatalistError", "check_case",
    "validate_datalist",
]
