"""The segmentation maths every stage and method shares: DenseCRF, multi-scale inference, confusion-matrix
scores and per-pixel loss building blocks. Pure functions over arrays and tensors; no storage, no Ray."""
