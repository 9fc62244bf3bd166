"""Packed data layouts that the ops read, below the ops (imports torch only).

- :mod:`svdkernels.formats.int4`: SVDQuant's int4 groups (packing, quantisation and
  dequantisation of weights and activations). Its public names are re-exported by
  :mod:`svdkernels.quant`, the layer users import them from.
"""
