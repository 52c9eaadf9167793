"""The DiT's parallel building blocks: the backend, TP linears, attention, norms, RoPE, embeddings, token shards."""
