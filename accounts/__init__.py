"""API tokens (hashed, expiring, revocable) and the ops console's defence against guessing."""
