"""Evaluation: how good a model is. Log-likelihoods, reward scores, classification reports, corpus
metrics of generated text (BLEU, chrF) and generation diversity (model collapse).

Training verbs call this package for their held-out scores (classification reports, preference
accuracy), and the Python API for scoring, so each measurement is written once.
"""
