from alpaca_jax.tokenizer.base import Tokenizer
from alpaca_jax.tokenizer.bpe import ByteLevelBPETokenizer
from alpaca_jax.tokenizer.spm import SentencePieceTokenizer, SpmVocabTokenizer

__all__ = ["Tokenizer", "ByteLevelBPETokenizer", "SentencePieceTokenizer", "SpmVocabTokenizer"]
