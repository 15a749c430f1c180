"""The classifier's big matrix outside the trainer: in-process store, ZeroMQ server and client."""
