"""Cryptographic building blocks: the field, int8 quantization, one-time pads and their pool."""
