"""Spectral analysis of models: metrics on tensors, batched model analyses and
``python -m svdkernels analyze``.

Metrics (``metrics.py``, batched over leading dims): :func:`singular_values`,
:func:`effective_rank` (Roy–Vetterli), :func:`stable_rank`, :func:`nuclear_norm`
(exact or the L1,2 surrogate :func:`l12_norm`), :func:`matrix_nuclear_norm_score`
(Li et al. 2024), :func:`intruder_dimensions` (Shuttleworth et al. 2024).

Models (``model.py``): :func:`spectra`, :func:`model_intruders`,
:func:`gradient_spectra` (per-sample gradient spectra, Li et al. 2025),
:func:`composition_scores` (Elhage et al. 2021; Merullo et al. 2024), on the
BERT/Llama/GPT-2 layouts of ``layouts.py``. The command line is ``cli.py``.

Imports point down: this layer uses calibration and torch (its SVDs are exact
batched torch/LAPACK calls: trained weights have flat spectra on which a randomized
SVD's top singular values are off by 1e-2); transformers and matplotlib only in
the command line.
"""
from svdkernels.analysis.layouts import LAYOUTS, AttentionLayer, Layout, LinearRef, detect_layout, linear_modules
from svdkernels.analysis.metrics import (
    IntruderResult,
    effective_rank,
    intruder_dimensions,
    l12_norm,
    matrix_nuclear_norm_score,
    nuclear_norm,
    singular_values,
    stable_rank,
)
from svdkernels.analysis.model import (
    CompositionScores,
    GradientSpectra,
    causal_lm_loss,
    composition_scores,
    gradient_spectra,
    model_intruders,
    spectra,
)

__all__ = [
    "LAYOUTS", "AttentionLayer", "CompositionScores", "GradientSpectra", "IntruderResult", "Layout", "LinearRef",
    "causal_lm_loss", "composition_scores", "detect_layout", "effective_rank", "gradient_spectra",
    "intruder_dimensions", "l12_norm", "linear_modules", "matrix_nuclear_norm_score", "model_intruders",
    "nuclear_norm", "singular_values", "spectra", "stable_rank",
]
