"""ringada: adapter fine-tuning of pretrained transformer LMs across a ring (or star) of small machines."""

__version__ = "0.1.0"
