"""Evaluation: how good a model is. Log-likelihoods, reward scores and classification reports.

Training verbs call this package for their held-out scores (classification reports, preference
accuracy), and the Python API for scoring, so each measurement is written once.
"""
