"""Training: sharding, train state, optimizers, losses and the train steps."""
