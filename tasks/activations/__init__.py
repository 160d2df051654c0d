"""Stage 1: run a language model over a corpus and cache its activations at named hookpoints."""
