"""summ: measure what each batch configuration costs per sample when fine-tuning Korean dialogue summarizers."""

__version__ = "0.1.0"
