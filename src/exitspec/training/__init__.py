"""Training exit heads by self-distillation from the frozen base model (see trainer.py)."""
