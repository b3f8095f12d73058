"""The common package: config, data, models, dist, optim, engine, checkpoint, logging, eval."""
