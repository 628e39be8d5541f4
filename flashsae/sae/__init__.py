"""Everything that uses the ops: the model, ASI, activations, training driver and CLI."""
