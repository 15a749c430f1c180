"""Class samplers: which classes are active in a mini-batch."""
