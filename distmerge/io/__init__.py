"""Checkpoint reading, vocabulary reconciliation, and writing of the merged model folder."""
