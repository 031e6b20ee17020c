"""The training loop and its step. ``engine.step`` is pure torch; the DeepSpeed engine module (the only one
importing deepspeed) arrives with ``flat-ray train``."""
