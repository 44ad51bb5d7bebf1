"""Adapters for the trainers people already use (Hugging Face Trainer, TRL, Lightning), imported
lazily behind their extras. Empty until their issue lands: the ops and ``fastkd.Distiller`` are the
public API today."""
