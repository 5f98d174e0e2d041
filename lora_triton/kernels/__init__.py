"""Layer 3 - Triton kernels (``@triton.jit`` functions and their launchers only).

Set ``TRITON_INTERPRET=1`` before importing any kernel module to run them on CPU tensors
through Triton's interpreter (that is how the test suite runs without a GPU).
"""
