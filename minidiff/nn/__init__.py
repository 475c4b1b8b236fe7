"""minidiff.nn — chapter 1's building blocks, from which every network in minidiff is made."""
from .attention import (CrossAttention, FeedForward, GEGLU, SelfAttention, TimestepEmbedding, TransformerBlock,
                        attention, attention_impl, attention_probs, get_attention_impl, set_attention_impl,
                        sinusoidal_positions, timestep_embedding)
from .resnet import BasicBlock, ResnetBlock
from .perceptron import MLP, Perceptron, relu
from .conv import Conv2d, avg_pool2d, conv2d, max_pool2d
from .latent import PCA, Autoencoder
