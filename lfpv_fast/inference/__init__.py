"""Inference on whole photos: `whole_image.py` (exact whole-image forward in strips, memory estimates, device
and precision checks), `enhancement.py` (whole image or tiles: `plan_enhancement`, `ImageEnhancer`) and
`retinexformer_strips.py` (Retinexformer's exact strip path)."""
