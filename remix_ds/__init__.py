"""remix_ds: continual memorization of factoids (REMIX) on DeepSpeed."""
__version__ = "0.1.0"
