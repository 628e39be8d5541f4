"""Mutation testing of the kernels, the optimizer and the trainer's loss code (`make mutate`)."""
