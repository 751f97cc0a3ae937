"""Pure tensor math of the merge methods: no I/O, no Ray, testable on 3x3 examples by hand.

Every function takes a stacked task-vector tensor ``[T, ...]`` (or per-model tensors) and numbers, and
returns tensors. The engine applies them to chunks of real checkpoints; ``distmerge.methods`` says which
function runs in which pass.
"""
