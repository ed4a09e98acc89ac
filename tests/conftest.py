"""Shared test setup: run Triton kernels under the CPU interpreter where there is no GPU.

This must happen before anything imports triton, which reads TRITON_INTERPRET when kernels are
launched and JIT-decorated; conftest.py is imported by pytest before any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
