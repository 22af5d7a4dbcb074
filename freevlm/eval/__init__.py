"""Evaluation: official caption metrics, VQA accuracy, VisDial ranking, speed, threshold sweeps and plots."""
