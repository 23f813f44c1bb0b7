"""The tiny T5 shared by tests and demos: 2 encoder and 3 decoder blocks (an asymmetric depth
catches encoder/decoder mix-ups), 4 heads, a 288-token vocabulary that splits over 2 devices,
and few relative-position buckets so that short test sequences reach the logarithmic ones."""

from tagi_jax.models.t5_config import T5Config

TINY_T5 = T5Config(
    vocab_size=288,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
)
