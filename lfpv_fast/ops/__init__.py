"""The ops in their twins and the choice between them.

`reference.py` is the eager definition of correct; `cpu_ops.py` the CPU set of backend `auto`; the Triton set
lives in `kernels/ops.py` (installed as `lfpv_fast.kernels.ops`). `backends.py` picks one set for a device and a
backend name.
"""
