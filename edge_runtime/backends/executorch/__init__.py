"""The ExecuTorch runtime: each stage lowered to XNNPACK programs, its LoRA tensors and AdamW in Python."""
