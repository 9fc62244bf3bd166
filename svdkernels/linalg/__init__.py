"""Factorisations built on the ops: one home for what is more than one op call.

- :func:`select_rank` (``select_rank.py``): rank from a batch of spectra (energy, elbow);
- :func:`kpsvd` (``kpsvd.py``): the Van Loan–Pitsianis nearest sum of Kronecker
  products, with :func:`kron_sum` and :func:`rearrange`;
- :func:`svd_lowrank`, :func:`pca_lowrank` (``lowrank.py``): torch's signatures on
  :func:`svdkernels.rsvd` (dense, batched, sparse, float64);
- :func:`robust_svd` (``robust.py``): rSVDdpd, an SVD that resists gross outliers;
- :func:`pivoted_qr`, :func:`select_columns` (``pivoted.py``): column-pivoted and
  strong rank-revealing QR (Gu–Eisenstat), e.g. HIR-Diff's band selection;
- :func:`kron_sbl` (``kron_sbl.py``): sparse Bayesian learning with a Kronecker-structured
  dictionary and support (KroSBL), its hyperparameters updated by SVDs.

Imports point down: this package imports :mod:`svdkernels.ops` and torch, never a layer.
"""
from svdkernels.linalg.kpsvd import kpsvd, kron_sum, rearrange
from svdkernels.linalg.kron_sbl import KronSBLResult, kron_sbl
from svdkernels.linalg.lowrank import pca_lowrank, svd_lowrank
from svdkernels.linalg.pivoted import pivoted_qr, select_columns
from svdkernels.linalg.robust import robust_svd
from svdkernels.linalg.select_rank import select_rank

__all__ = ["KronSBLResult", "kpsvd", "kron_sbl", "kron_sum", "pca_lowrank", "pivoted_qr", "rearrange", "robust_svd", "select_columns", "select_rank",
           "svd_lowrank"]
