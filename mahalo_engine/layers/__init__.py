"""Building blocks of the decoder, one idea per module: RMSNorm, RoPE, attention, SwiGLU MLP."""
