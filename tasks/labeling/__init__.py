"""Labeling of dictionary latents: the contexts each latent fires hardest on, a first label read off them
(`top_contexts`), and the Parquet feature table the catalog and the UI read."""
