"""Numbers the Triton kernels share with their reference twins, stated once. Imports nothing (no Triton):
lfpv_fast.ops.reference takes them from here, so that the kernels import nothing above them."""

# The published transformer masks keys with masked_fill(-1e9) before the softmax, so a query row
# whose keys are all masked gets uniform weights (not NaN, not zeros).
MASKED_SCORE = -1e9
