"""Quantized model families converted from timm modules (ViT/DeiT, Swin)."""
