"""ringtune: private split fine-tuning of language models across the devices you own."""
__version__ = "0.1.0"
