"""Triton kernels and their launchers, one module per op family.

Importing ``svdkernels`` never imports this package (nor triton): the op modules
import ``svdkernels.triton.<family>`` only when they dispatch to the triton backend.
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run
on CPU tensors through the Triton interpreter, which is how CI tests them.
"""
