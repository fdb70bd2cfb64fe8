"""Fused training kernels (Triton, with torch fallbacks) and the patcher that swaps them into HF models.

Entry point: ``llmforge.kernels.patch.patch_model(model) -> PatchReport``.
"""
