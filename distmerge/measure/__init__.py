"""Measurement stages: statistics of each expert on its own task's data, for data-aware merges (RegMean's Grams;
the format leaves room for Fisher information under another ``kind``)."""
