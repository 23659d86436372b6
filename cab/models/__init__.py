"""Small backbones with an attention slot (encoder, decoder-only, encoder-decoder) for cab's tasks."""

from cab.models.backbones import Decoder, Encoder, EncoderDecoder
from cab.models.layers import FeatureEmbedding, Layer, MultiHeadAttention, Stack, TokenEmbedding, sinusoidal_positions
from cab.models.params import PARAMETER_LIMIT, ParameterCount, count_parameters
from cab.models.slots import DEFAULT_BASE, AttentionSlots

__all__ = [
    "AttentionSlots", "DEFAULT_BASE", "Decoder", "Encoder", "EncoderDecoder", "FeatureEmbedding", "Layer",
    "MultiHeadAttention", "PARAMETER_LIMIT", "ParameterCount", "Stack", "TokenEmbedding", "count_parameters",
    "sinusoidal_positions",
]
