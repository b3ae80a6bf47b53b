"""Workflows as library code: train, PTQ, QAT, evaluate and the demo."""
