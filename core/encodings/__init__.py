"""Weight encodings beyond plain dtypes (quantized formats), decoded per tensor in the sources layer."""
