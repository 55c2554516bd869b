"""Post-training on TRL: SFT, then DPO (the standard DPOTrainer path and the shared-prompt fast path)."""
