"""ARC-AGI data: tasks, grids, augmentation, sampling."""
