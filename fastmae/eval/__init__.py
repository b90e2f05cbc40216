"""Downstream evaluation: linear probe, partial and full fine-tuning, attention diagnostics."""
