"""Judging: the metrics (pure math on pooled statistics), per-layer scores, the finding rules
and their one vocabulary, the model-level output-divergence check and the attribution of the
output gap to layers. No torch module is changed here."""
