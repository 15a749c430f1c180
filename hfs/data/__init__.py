"""Datasets and file formats: RecordIO, verification .bin, file lists, synthetic identities."""
