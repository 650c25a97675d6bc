"""Diagnosis: what went wrong with a run, a model, its data, its tokenizer or its memory, in plain words and pictures."""
