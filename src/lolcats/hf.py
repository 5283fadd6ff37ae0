"""Registration of lolcats models with transformers' Auto classes (filled in by export)."""
