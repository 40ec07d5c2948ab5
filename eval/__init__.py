"""Evaluation (FID/KID, CLIP score, reports): see the evaluation issue."""
