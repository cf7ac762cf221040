"""Evaluation as in the paper's Table 1: CLIP-T, CLIP-I, CLIP-I* and CLIP-AS from local model files."""
