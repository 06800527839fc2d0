"""Data: the competition format and the bundled sample, splits and folds, synthetic data, quality
checks, augmentation and text edits, tokenization, collation and the training sampler."""
