"""Ablation analysis: collect runs' results.json (or W&B runs), tabulate (Markdown, LaTeX
booktabs, mean ± std over seeds), plot, and regenerate RESULTS.md sections.

    python -m analysis.report multirun/2026-11-24/10-00-00 --name criteria --by criterion,heal
"""
