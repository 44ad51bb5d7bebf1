"""The demos of ``fastkd demo`` (digits.py: an MLP on scikit-learn's digits) and ``fastkd lm-demo``
(byte_lm.py: a byte-level transformer LM on the standard library's sources)."""
