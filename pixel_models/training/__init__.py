"""Training machinery: the LightningModule, likelihood bookkeeping, callbacks, fault handling, the resumable
training order, experiment tracking and safe checkpoint loading."""
