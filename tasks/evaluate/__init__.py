"""Evaluation of a trained dictionary: reconstruction quality on held-out activations (`metrics`) and the
language model's next-token loss with the dictionary spliced in at its hookpoint (`ce_loss`)."""
