"""Diagnosis: what went wrong in a run or a model, in plain words and pictures (`lmforge doctor`, `attention`)."""
