"""Model classes of ours that Hugging Face does not ship (registered with the Auto classes on import)."""
