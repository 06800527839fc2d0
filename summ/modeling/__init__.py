"""Models: tokenizers, tiny and real models (LoRA, QLoRA), the loss, and trained models saved and loaded."""
