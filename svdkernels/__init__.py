"""svdkernels: PyTorch kernels for SVD-centric deep learning."""
